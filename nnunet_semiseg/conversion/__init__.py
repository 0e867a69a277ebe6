"""Dataset conversion into nnU-Net's raw format with the plugin's unlabelled folder (``imagesTrUnlabeled/``),
and label-budget splits of existing nnU-Net datasets.

The converters validate every case before they write anything, then write ``$nnUNet_raw/DatasetXXX_Name/``
(``imagesTr``/``labelsTr`` for labelled and validation cases, ``imagesTrUnlabeled`` for unlabelled images,
``imagesTs``/``labelsTs`` for test cases, ``dataset.json``) and ``$nnUNet_preprocessed/DatasetXXX_Name/
splits_final.json`` whose fold 0 is the benchmark split. See ``docs/datasets.md``.

Heavy imports (SimpleITK, h5py, nnunetv2) stay inside the functions so that importing this package is cheap.
"""
from nnunet_semiseg.conversion.acdc import convert_acdc
from nnunet_semiseg.conversion.common import (ConversionInputError, InputDataError, MissingInputError,
                                              UnknownLayoutError)
from nnunet_semiseg.conversion.la import convert_la
from nnunet_semiseg.conversion.mmwhs import convert_mmwhs
from nnunet_semiseg.conversion.split import make_label_budget_split

__all__ = ['convert_acdc', 'convert_la', 'convert_mmwhs', 'make_label_budget_split', 'InputDataError',
           'ConversionInputError', 'MissingInputError', 'UnknownLayoutError']
