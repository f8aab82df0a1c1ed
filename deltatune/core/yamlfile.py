"""YAML as people write it: ``lr: 1e-4`` is a number.

PyYAML follows YAML 1.1, whose floats need a dot (``1.0e-4``): ``1e-4`` stays the string ``'1e-4'``, and a learning
rate written the way papers and PyTorch's docs write it was refused as "should be a number". YAML 1.2, and the
other loaders people meet (ruamel.yaml, Go's, JavaScript's), read it as a float. ``load_yaml`` is PyYAML's safe
loader (no Python objects) with YAML 1.2's exponent floats added; every config, ``--set`` value and option deltatune
reads goes through it.
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    """SafeLoader plus YAML 1.2's floats without a dot (``1e-4``, ``5E3``, ``-2e+1``)."""


# a mantissa with digits (1, 1., 1.5, .5), an exponent with digits; add_implicit_resolver copies SafeLoader's table
# before adding, so yaml.safe_load itself is unchanged
_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                              list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """The value of a YAML document (or scalar) ``text``; raises ``yaml.YAMLError`` as ``yaml.safe_load`` does."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
