"""Recommendation: interactions + item text → a ranked list of items per user.

Modules, one job each:

* :mod:`.movielens` — fetch MovieLens-100K from the recbole wheel and read its atomic files;
* :mod:`.data` — read and validate interactions + items tables (MovieLens or a user's own files);
* :mod:`.protocol` — the evaluation protocol (implicit feedback, chronological leave-last-out,
  full ranking over unseen items), its cold-start variant (a share of items in no training table)
  and the ranking metrics;
* :mod:`.baselines` — most-popular, BPR matrix factorisation (torch), BPR with the history folded in,
  item-kNN over the recent history;
* :mod:`.bootstrap` — paired bootstrap intervals over users (the gate's win / tie / loss);
* :mod:`.atomic_export` — our split as RecBole atomic files (``benchmarks/recsys_peers.py``).

Not built yet: the two-tower text model, the ranker, the model bundle, the gate and ``recommend``.
"""
