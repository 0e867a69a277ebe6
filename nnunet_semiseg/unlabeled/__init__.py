"""The unlabelled stream (design §3): ``imagesTrUnlabeled/`` in the raw dataset, preprocessed with the dataset's
own plans into ``<data_identifier>_unlabeled/``, served as weak/strong views with identical geometry."""
from .discovery import UnlabeledDataError, find_unlabeled_cases, unlabeled_raw_folder  # noqa: F401
