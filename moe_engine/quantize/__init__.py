"""Weight-only int8/int4 quantization of MoE checkpoints (experts always; attention and dense linears on request).

``me.quantize(model, bits=4)`` is :func:`moe_engine.quantize.quantize.quantize`. Once this package is
imported, ``moe_engine.quantize`` names the package rather than the function (Python binds a
subpackage to its parent's attribute), so the package itself is made callable with the same
signature: ``me.quantize(...)`` works before and after.
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from moe_engine.quantize.quantize import quantize

        return quantize(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
