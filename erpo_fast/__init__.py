"""erpo-fast: GRPO-family and ERPO reinforcement-learning trainer with per-row-temperature fused kernels."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"

# The top-level folders kernels/ and csrc/ are installed as erpo_fast.kernels and erpo_fast.csrc (see
# setup.py). kernels/ has no __init__.py on purpose: PyPI's `kernels` (Hugging Face's kernel hub, which
# transformers imports) owns that top-level name, and a folder without __init__.py is only a namespace
# portion, which never shadows a regular package, even with the checkout first on sys.path. So
# erpo_fast.kernels is a namespace package; its ops are erpo_fast.kernels.fused_linear and .sampling.
# When the package runs straight from a source checkout, nothing installed maps the two folders, so this
# finder does, as a fallback placed after every other finder (an installed or editable copy wins).
_REPO_ROOT = Path(__file__).resolve().parent.parent
_SOURCE_SUBPACKAGES = {f"{__name__}.kernels": _REPO_ROOT / "kernels", f"{__name__}.csrc": _REPO_ROOT / "csrc"}


class _SourceCheckoutFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        for package, folder in _SOURCE_SUBPACKAGES.items():
            if fullname == package or fullname.startswith(package + "."):
                relative = fullname[len(package):].lstrip(".").split(".") if fullname != package else []
                base = folder.joinpath(*relative)
                if (base / "__init__.py").is_file():
                    return importlib.util.spec_from_file_location(
                        fullname, base / "__init__.py", submodule_search_locations=[str(base)]
                    )
                if base.with_suffix(".py").is_file():
                    return importlib.util.spec_from_file_location(fullname, base.with_suffix(".py"))
                if base.is_dir():  # a namespace package (kernels/ itself)
                    spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)
                    spec.submodule_search_locations = [str(base)]
                    return spec
        return None


# Only in a source checkout: an installed copy's parent folder is site-packages, whose `kernels` is HF's.
if (_REPO_ROOT / "setup.py").is_file() and not any(isinstance(f, _SourceCheckoutFinder) for f in sys.meta_path):
    sys.meta_path.append(_SourceCheckoutFinder())
