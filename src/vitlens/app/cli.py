"""The ``vitlens app`` subcommand (wired into :mod:`vitlens.cli`)."""
from __future__ import annotations

import argparse
import ipaddress
import sys

from ..errors import InputError
from . import MAX_PIXELS, MAX_UPLOAD_MB


def add_app_parser(sub, add_model_args) -> argparse.ArgumentParser:
    a = sub.add_parser("app", help="interactive explorer in the browser: maps side by side, parameters, faithfulness "
                                   "curves, bench folders",
                       description="Start a local web app (Gradio) to explain images interactively: upload an image or "
                                   "pick a sample, compare methods side by side, change their parameters, plot "
                                   "insertion/deletion curves, and browse a bench folder (--bench). Needs "
                                   'pip install "vitlens[app]". Binds 127.0.0.1 unless --host says otherwise.')
    add_model_args(a)
    a.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default %(default)s: this machine only; 0.0.0.0 exposes the app, which "
                        "has no authentication, to the network)")
    a.add_argument("--port", type=int, default=7860, help="port (default %(default)s)")
    a.add_argument("--bench", default=None, metavar="DIR",
                   help="a vitlens bench output folder to browse read-only (Bench tab)")
    a.add_argument("--bench-images", default=None, metavar="ROOT",
                   help="also show the bench's images found under ROOT (typically the bench's --data); without it "
                        "the app reads nothing outside --bench DIR")
    a.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB,
                   help="largest accepted upload in MB (default %(default)s)")
    a.add_argument("--max-pixels", type=float, default=MAX_PIXELS,
                   help="largest accepted image in pixels, read from the file header before decoding "
                        "(default %(default).0f)")
    a.set_defaults(func=cmd_app)
    return a


def cmd_app(args) -> int:
    from ..cli_common import check_device as _check_device, load_from_args as _load

    if not 0 <= args.port <= 65535:
        raise InputError(f"--port {args.port}: give a port between 1 and 65535 (0: any free port).")
    if args.max_upload_mb <= 0 or args.max_pixels <= 0:
        raise InputError("--max-upload-mb and --max-pixels must be positive.")
    host = args.host.strip()
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    _check_device(args.device)
    from .ui import import_gradio

    import_gradio()  # a missing extra is reported before the model loads
    from .bench_view import BenchView

    bench = BenchView(args.bench, args.bench_images) if args.bench else None  # checked before the model loads
    model = _load(args)
    from .core import Explorer
    from .ui import launch

    explorer = Explorer(model, max_bytes=int(args.max_upload_mb * 2**20), max_pixels=int(args.max_pixels),
                        model_name=args.model)
    if not loopback:
        print(f"vitlens app: warning: listening on {host}: anyone who can reach this address can use the app "
              "(it has no authentication).", file=sys.stderr)
    try:
        demo, url = launch(explorer, bench, host=host, port=args.port or None, block=False, quiet=True)
    except OSError as e:
        raise InputError(f"--host {host} --port {args.port}: cannot listen there ({' '.join(str(e).split())}); "
                         "choose another --port.") from None
    print(f"vitlens app: serving {args.model} at {url} (Ctrl-C to stop)", flush=True)
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
        explorer.close()
    return 0
