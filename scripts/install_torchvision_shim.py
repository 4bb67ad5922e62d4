"""Install a tiny import hook that lets PyPI's CUDA-built torchvision import beside a CPU-only torch.

torchvision 0.28.0 is the only release pinned to torch 2.13.0 and it links against CUDA. With the CPU torch its
compiled ops cannot load, and `torchvision/_meta_registrations.py` then fails on `torchvision::nms` because that op
schema was never defined. The hook (a `.pth` file plus a module in site-packages) waits until that module is about to
be imported and, only if torchvision's compiled ops are missing, defines the two schemas so the import succeeds.
ComfyUI imports torchvision at start-up; none of the paths we use call the compiled ops.
"""
import pathlib
import sysconfig

SHIM = '''"""Defines torchvision::nms/qnms schemas when torchvision's compiled ops are absent (CPU torch + CUDA torchvision)."""
import importlib.abc
import sys

_KEEP = []


class _TorchvisionSchemaShim(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision._meta_registrations":
            return None
        sys.meta_path.remove(self)
        try:
            import torch
            import torchvision.extension as ext
            if not ext._has_ops():
                lib = torch.library.Library("torchvision", "FRAGMENT")
                _KEEP.append(lib)
                for op in ("nms", "qnms"):
                    try:
                        lib.define(op + "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                    except RuntimeError:
                        pass
        except Exception:
            pass
        return None


if not any(type(f).__name__ == "_TorchvisionSchemaShim" for f in sys.meta_path):
    sys.meta_path.insert(0, _TorchvisionSchemaShim())
'''


def main() -> None:
    site = pathlib.Path(sysconfig.get_paths()["purelib"])
    (site / "_portrait3d_tv_shim.py").write_text(SHIM)
    (site / "_portrait3d_tv_shim.pth").write_text("import _portrait3d_tv_shim\n")
    print(f"[setup] torchvision schema shim installed in {site}")


if __name__ == "__main__":
    main()
