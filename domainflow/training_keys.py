"""Names of the entries a private (DP-SGD) or federated candidate adds to its ``domainflow.json``.

A module of constants with no imports, so that the gates (pure functions over numbers, no torch) read the same
names that training writes (:mod:`domainflow.private_training`, :mod:`domainflow.federated`) and evaluation
reports (:func:`domainflow.footprint.training_figures`).
"""

#: The privacy budget a DP candidate spent (epsilon, delta) and how (noise multiplier, clipping, steps, accountant).
PRIVACY_KEY = "differential_privacy"
#: How a federated candidate was trained: clients, rounds, partition, rows and labels per client.
FEDERATED_KEY = "federated"
