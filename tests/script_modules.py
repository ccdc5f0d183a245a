"""Scripts of the repository (bench/, launch/) imported as modules in tests, by path: they are not packages."""
import importlib.util
import sys


def load_script(path, name: str):
    """The Python file ``path`` as module ``name``, registered in ``sys.modules`` (dataclasses resolve annotations
    through it). Scripts that import their neighbours put their own folder on ``sys.path``."""
    spec = importlib.util.spec_from_file_location(name, str(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
