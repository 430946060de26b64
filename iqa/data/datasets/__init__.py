"""One module per data set. Each declares its DatasetRecord (names, default root, expected
layout, annotation files, reader) and registers it; importing this package imports them all,
so adding a data set is adding one module here.
"""
import importlib
import pkgutil

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f'{__name__}.{_module}')
