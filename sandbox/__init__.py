"""Wire-faithful local stand-ins for the vendor image APIs, with fault injection driven by the prompt.

Start one with `async with Sandbox.running(port=0) as sandbox:` and point an adapter at
`sandbox.base_url`; run one from a shell with `python -m sandbox --port 8400`.
"""

from __future__ import annotations

from sandbox.app import Sandbox

__all__ = ["Sandbox"]
