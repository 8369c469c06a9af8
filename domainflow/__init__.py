"""domainflow core: the pieces every task and flow shares (settings, records, model I/O, registry, metrics).

Importing the package also makes its classifier folders loadable by Hugging Face transformers
(``AutoModelForSequenceClassification.from_pretrained(folder)``, ``pipeline("text-classification",
model=folder)``, no ``trust_remote_code``): :mod:`domainflow.hf_export` registers the folders' model
type. It does so *when transformers' auto classes are imported*, not now: registering needs
transformers and torch (measured ~5 s on 2 cores), while ``import domainflow`` takes a few
milliseconds, which ``domainflow --help`` and every light process keep. The config class is
registered once ``transformers.models.auto.configuration_auto`` has run (it has imported the
configuration code the class needs), or here and now if it ran before this package was imported;
the model class, the first time a config of that type is made (see
:func:`domainflow.hf_export.register_model`). Nothing else of transformers is touched.
"""

from __future__ import annotations

import importlib.machinery
import sys
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:  # importlib.abc alone would cost ~8 ms (it imports importlib.resources, tempfile, shutil)
    from collections.abc import Sequence
    from importlib.abc import Loader
    from types import ModuleType
    from typing import Any

__version__ = "0.1.0"

# Once this transformers module has run, importing domainflow.hf_export registers the config class.
_TRIGGER = "transformers.models.auto.configuration_auto"


def _register() -> None:
    """Import domainflow.hf_export, which registers its config class as its last step; a failure is logged and
    never breaks the import of transformers.

    If hf_export is itself being imported (it imports the trigger module), this finds it in ``sys.modules``
    half-run and returns: its own last line registers the config a moment later.
    """
    try:
        import domainflow.hf_export  # noqa: F401 - imported for its registration
    except Exception:  # noqa: BLE001 - transformers must stay importable; the warning says what failed
        import logging  # here, not at the top: `import domainflow` stays as light as it was

        logging.getLogger(__name__).warning(
            "domainflow could not register its model type with transformers; load its folders with "
            "domainflow.modeling.load_classifier, or import domainflow.hf_export to see the error",
            exc_info=True,
        )


class _RunAfter:
    """A module's own loader, then the registration once the module has run (a loader by duck typing)."""

    def __init__(self, loader: Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _register()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)  # get_source, get_filename, …: what tools ask of the real loader


class _RegisterWithTransformers:
    """Finds the trigger module as usual and wraps its loader (see the module docstring); a meta path finder
    by duck typing."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _TRIGGER:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return None
        spec.loader = cast("Loader", _RunAfter(spec.loader))
        return spec


def _install_transformers_hook() -> None:
    if _TRIGGER in sys.modules:
        _register()
    elif not any(isinstance(finder, _RegisterWithTransformers) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterWithTransformers())


_install_transformers_hook()
