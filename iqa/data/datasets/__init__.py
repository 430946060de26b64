"""One module per data set. Each declares its DatasetRecord (names, default root, expected
layout, annotation files, reader) and registers it; importing this package imports them all,
so adding a data set is adding one module here.
"""
import importlib
import pkgutil


def import_all() -> list[str]:
    """Import every module on this package's path (each registers its data set); returns their names."""
    names = sorted(m.name for m in pkgutil.iter_modules(__path__))
    for name in names:
        importlib.import_module(f'{__name__}.{name}')
    return names


import_all()
