"""llama.cpp's own HTTP server (from the xllamacpp wheel) on a GGUF file, as a peer for scripts/bench.py.

Run with a Python that has xllamacpp (a throwaway venv: `pip install xllamacpp`):
    /tmp/llvenv/bin/python scripts/llamacpp_server.py MODEL.gguf PORT
"""

from __future__ import annotations

import signal
import sys

import xllamacpp


def main(gguf: str, port: int) -> None:
    params = xllamacpp.CommonParams()
    params.model.path = gguf
    params.n_ctx = 16384
    params.n_parallel = 8  # slots, so that concurrent requests batch as they do in the other servers
    params.hostnames = ["127.0.0.1"]
    params.port = port
    server = xllamacpp.Server(params)
    print(f"llama.cpp serving {gguf} on {server.listening_address}", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    main(sys.argv[1], int(sys.argv[2]))
