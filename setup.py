"""Build configuration beyond pyproject.toml: the one C extension, ``hourglass.collector._otlpscan``.

It is the per-span hot path of OTLP decoding (see hourglass/collector/_otlpscan.c). It is optional: where
no C compiler is available the install still succeeds and ``hourglass.collector.decode`` falls back to the
pure-Python decoder (slower, same results); ``hourglass serve`` says so when it starts.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "hourglass.collector._otlpscan",
            sources=["hourglass/collector/_otlpscan.c"],
            extra_compile_args=["-O2", "-std=c99", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        )
    ]
)
