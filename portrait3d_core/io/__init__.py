"""Reading untrusted checkpoint files: our own pickle VM, torch.save zip and legacy readers.

Public entry points live in ``portrait3d_core.checkpoints``; this package holds the pieces, one job per file:

- ``limits``: size/depth limits and the two internal error kinds (``Refused``, ``Malformed``);
- ``records``: inert records the VM builds (``PersistentRecord``, ``Stub``, ``EasyDict``, ``Constructor``, ``Marker``);
- ``numpy_data``: numpy dtypes, arrays and scalars rebuilt from (shape, dtype string, bytes), plain dtypes only;
- ``tensors``: storages and tensors rebuilt from bytes + offset/size/stride with bounds checks;
- ``policy``: which global names a file may reference, and what each one resolves to;
- ``pickle_vm``: the pickle virtual machine (protocols 0–5) that only ever calls the policy's functions;
- ``materialize``: the validating walk that turns records into tensors and plain values;
- ``legacy``: the legacy (non-zip) ``torch.save`` format, as nested in ``torch.storage._load_from_bytes``;
- ``torch_zip``: ``torch.save`` zip archives and TorchScript archives (tensors only, code never read);
- ``torch_guard``: the one gate any ``torch.load(weights_only=True)`` in the package must pass.
"""
