"""The nnU-Net side of the library: the semi-supervised base trainer that the classes in ``trainers/`` build on."""
