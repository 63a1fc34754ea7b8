"""Build of weightops with its optional native extension `weightops._C`.

The kernels are added in kernels/ (see issue: C++/CUDA extension). Until they
exist this builds a pure-Python package.
"""
from setuptools import setup

setup()
