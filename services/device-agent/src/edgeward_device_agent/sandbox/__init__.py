"""The sandboxed inference worker (issue 5, docs/sandbox.md).

The agent's side is :mod:`.supervisor` (``InferenceWorker``, ``SandboxPolicy``); the child's
is :mod:`.worker`, which confines itself with :mod:`.confine` and the filter of
:mod:`.seccomp_bpf`, then runs onnxruntime (:mod:`.runtime`). They speak :mod:`.protocol`.
This package file imports nothing, so that the worker starts light.
"""
