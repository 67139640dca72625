"""Records, when torch is first imported, the process's OMP_WAIT_POLICY (loaded through PYTHONPATH).

ARIA_TORCH_ENV_LOG=FILE: append `<program>\t<OMP_WAIT_POLICY or None>` to FILE at the first `import torch`,
the moment OpenMP reads the variable. tests/test_entry_points.py runs each entry point with it.
"""

import os
import sys

_log = os.environ.get("ARIA_TORCH_ENV_LOG")
if _log:

    class _TorchImportProbe:
        def find_spec(self, name, path=None, target=None):
            if name == "torch":
                sys.meta_path.remove(self)
                with open(_log, "a") as fh:
                    fh.write(f"{os.path.basename(sys.argv[0] if sys.argv else '')}\t{os.environ.get('OMP_WAIT_POLICY')}\n")
            return None

    sys.meta_path.insert(0, _TorchImportProbe())
