"""The tuning variants (benchmarks/tuning_trainers) are nnU-Net trainers: nnU-Net's ``__init__`` records its
arguments by reading ``locals()`` for each name in ``inspect.signature(self.__init__)``, so a variant written as
``__init__(self, *args, **kwargs)`` fails with ``KeyError: 'args'`` at construction, after a benchmark has set up."""
import inspect
import os

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from conftest import REPO_ROOT

FOLDER = os.path.join('benchmarks', 'tuning_trainers')


def _variants(load_script):
    found = []
    for name in sorted(os.listdir(os.path.join(REPO_ROOT, FOLDER))):
        if name.endswith('.py'):
            module = load_script(os.path.join(FOLDER, name))
            found += [c for c in vars(module).values() if inspect.isclass(c) and issubclass(c, nnUNetTrainer)
                      and c.__module__ == module.__name__]
    return found


def test_every_variant_keeps_nnunets_init_signature(load_script):
    variants = _variants(load_script)
    assert variants, 'no trainer variant found'
    expected = list(inspect.signature(nnUNetTrainer.__init__).parameters)
    for cls in variants:
        assert cls.__name__.startswith('nnUNetTrainer')
        assert list(inspect.signature(cls.__init__).parameters) == expected, cls.__name__
