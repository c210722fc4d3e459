"""`coserve serve` and `coserve finetune`: a `cluster.Deployment` driven from the command line.

`serve` starts a deployment (or, with `--local`, one in-process engine without
Ray), puts the OpenAI-compatible HTTP server (coserve.api) in front of it,
prints one ready line with the API's URL and blocks until SIGINT or SIGTERM
(what `ray job stop` sends), then stops the HTTP server and shuts down. `finetune` submits a
YAML job to a running deployment and prints one line per optimizer step until
the job ends. Both run as Ray job entrypoints (`ray job submit -- coserve ...`),
where Ray sets RAY_ADDRESS, the default for `--ray-address`.
Exit codes: 0 done, 1 a job or the deployment failed, 2 bad input or nothing to
connect to (nothing was started or submitted), 130 stopped by a signal.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time

from coserve.api.settings import API_KEY_ENV

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
POLL_S = 0.5
CANCEL_WAIT_S = 30.0

# Flags passed through to EngineConfig (same names, dashes for underscores); only those given are passed.
_ENGINE_FLAGS = (
    ("--dtype", str, "float32, bfloat16, float16 or auto"),
    ("--device", str, "cpu, cuda, cuda:N or auto (inside a GPU worker Ray's GPU is used)"),
    ("--max-loras", int, "device adapter slots per worker"),
    ("--max-lora-rank", int, "largest adapter rank accepted"),
    ("--max-num-batched-tokens", int, "token budget per iteration"),
    ("--max-model-len", int, "longest sequence, prompt + output"),
    ("--tpot-slo-ms", float, "per-iteration latency target finetuning must stay under"),
    ("--kv-cache-memory-gb", float, "KV cache memory per worker"),
)


def add_cluster_commands(sub) -> None:
    """Registers `serve` and `finetune` on the `coserve` subparsers."""
    serve = sub.add_parser("serve", help="start a deployment on Ray and serve until SIGINT/SIGTERM",
                           description="Start a coserve deployment (a controller and engine workers in Ray "
                                       "actors) and keep it up until SIGINT or SIGTERM.")
    serve.add_argument("--model", required=True, help="model directory or .gguf file, readable by every worker")
    _add_address_flag(serve)
    serve.add_argument("--workers", type=int, default=1, help="device shares (default 1)")
    serve.add_argument("--name", default="coserve", help="deployment name others connect to (default coserve)")
    serve.add_argument("--mode", choices=["coserve", "spatial"], default="coserve",
                       help="coserve: one worker per share does both; spatial: an inference and a "
                            "finetuning worker per share")
    gpu = serve.add_mutually_exclusive_group()
    gpu.add_argument("--use-gpu", dest="use_gpu", action="store_const", const=True, default=None,
                     help="put workers on GPUs (default: when the cluster has any)")
    gpu.add_argument("--no-gpu", dest="use_gpu", action="store_const", const=False, help="CPU workers only")
    serve.add_argument("--gpus-per-worker", type=float, default=1.0, help="a fraction shares one GPU")
    serve.add_argument("--cpus-per-worker", type=float, default=1.0,
                       help="CPUs per worker on CPU (also its torch thread count)")
    serve.add_argument("--directory", help="job table, adapter registry and job outputs, shared by all nodes "
                                           "(default ~/.cache/coserve/deployments/NAME)")
    serve.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                       help="PEFT adapters to load at start")
    serve.add_argument("--local", action="store_true",
                       help="serve from one in-process engine (coserve.LLM) instead of a Ray deployment; "
                            "--workers, --mode, --ray-address and the other Ray options are then ignored")
    http = serve.add_argument_group("HTTP server (OpenAI-compatible API, /metrics, /health)")
    http.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    http.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 = a free one)")
    http.add_argument("--api-key", default=None,
                      help=f"require 'Authorization: Bearer KEY' on every /v1 route (default: ${API_KEY_ENV})")
    http.add_argument("--adapter-root", action="append", default=[], metavar="DIR",
                      help="directory under which adapters may be loaded over HTTP (repeatable); without one, "
                           "POST /v1/load_lora_adapter is refused")
    http.add_argument("--served-model-name", default=None, metavar="NAME",
                      help="the base model's id in the API (default: the model directory's name)")
    http.add_argument("--max-pending-requests", type=int, default=256,
                      help="sequences in flight before new requests get 429 (default 256)")
    http.add_argument("--data-dir", default=None,
                      help="uploaded files and fine-tuning outputs (default: DIRECTORY/api for a deployment, "
                           "~/.cache/coserve/local/NAME/api with --local)")
    engine = serve.add_argument_group("engine options (EngineConfig fields, for every worker)")
    for flag, kind, text in _ENGINE_FLAGS:
        engine.add_argument(flag, type=kind, default=None, help=text)
    serve.set_defaults(func=_serve)

    finetune = sub.add_parser("finetune", help="run a YAML finetuning job on a running deployment",
                              description="Submit a finetuning job (a YAML file of FinetuneConfig fields) to a "
                                          "running deployment and print its progress until it ends. "
                                          "Ctrl-C (or SIGTERM) cancels the job.")
    finetune.add_argument("job", help="job YAML file; relative paths in it are relative to the file")
    finetune.add_argument("--deployment", default="coserve", help="deployment name (default coserve)")
    _add_address_flag(finetune)
    finetune.add_argument("--worker", help="run on this worker (default: the one with the most headroom)")
    finetune.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    finetune.set_defaults(func=_finetune)


def _add_address_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ray-address", default=None,
                        help="'auto', HOST:PORT (the cluster's GCS) or ray://HOST:PORT; default: $RAY_ADDRESS "
                             "(set by Ray inside `ray job submit`), else "
                             + ("a new local Ray (give 'auto' to join a `ray start` cluster)"
                                if parser.prog.endswith("serve") else "the cluster `ray start` made on this machine"))


# ---- coserve serve ---------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    from coserve.config import EngineConfig

    engine_kwargs = {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_"))
                     for flag, _, _ in _ENGINE_FLAGS}
    engine_kwargs = {k: v for k, v in engine_kwargs.items() if v is not None}
    try:
        adapters = _parse_lora_modules(args.lora_modules)
        address = None if args.local else _ray_address(args.ray_address)
        # NOTE: Deployment.start checks these too, but only after joining Ray; a typo should not wait for that.
        EngineConfig(model=args.model, **engine_kwargs)
        if not os.path.exists(args.model):
            raise ValueError(f"model {args.model!r} does not exist (a model directory or a .gguf file)")
        settings = _server_settings(args)
    except ValueError as exc:
        return _fail("serve", exc, EXIT_USAGE)

    from coserve.api.server import bind_socket

    try:
        # Bound before anything starts: a busy port fails in a second, not after the engines load.
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        return _fail("serve", exc, EXIT_USAGE)
    stop = _StopSignals()
    stop.install()
    try:
        if args.local:
            return _run_local(args, engine_kwargs, adapters, stop, settings, sock)
        from cluster.ray_connect import connect_ray

        try:
            owns_ray = connect_ray(address)
        except (ConnectionError, ValueError) as exc:
            return _fail("serve", exc, EXIT_USAGE)
        except Exception as exc:   # e.g. Ray's AuthenticationError: a message, not a traceback
            return _fail("serve", f"cannot join Ray at {address or 'a local instance'}: {exc}", EXIT_FAILED)
        # NOTE: ray.init installs its own SIGTERM handler (sys.exit); ours must win so a stop always shuts down.
        stop.install()
        try:
            return _run_deployment(args, engine_kwargs, adapters, stop, settings, sock)
        finally:
            if owns_ray:
                import ray

                ray.shutdown()
    finally:
        sock.close()


def _server_settings(args: argparse.Namespace):
    """The HTTP server's settings from the flags (ValueError for bad ones, before anything starts)."""
    from coserve.api.settings import ServerSettings

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    for root in args.adapter_root:
        if not os.path.isdir(root):
            raise ValueError(f"--adapter-root {root!r} is not a directory")
    name = args.served_model_name or _model_name(args.model)
    if args.data_dir is not None:
        data_dir = args.data_dir
    elif args.local:
        data_dir = os.path.join(os.environ.get("COSERVE_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                                             "coserve")), "local", name, "api")
    else:
        from cluster.deployment import default_directory

        data_dir = os.path.join(args.directory or str(default_directory(args.name)), "api")
    return ServerSettings(model_id=name, api_key=args.api_key, adapter_roots=list(args.adapter_root),
                          data_dir=data_dir, max_pending_requests=args.max_pending_requests)


def _model_name(model: str) -> str:
    base = os.path.basename(os.path.normpath(os.path.abspath(model)))
    return base[:-len(".gguf")] if base.endswith(".gguf") else base


def _start_http(backend, settings, adapters: dict[str, str], sock):
    """The OpenAI-compatible server over `backend`, accepting requests when this returns."""
    from coserve.api.app import create_app
    from coserve.api.server import HTTPServer

    os.makedirs(settings.data_dir, exist_ok=True)
    app = create_app(backend, settings)
    app.state.coserve.adapter_paths.update(adapters)   # /v1/models shows where each came from
    return HTTPServer(app, sock=sock).start()


def _run_local(args: argparse.Namespace, engine_kwargs: dict, adapters: dict[str, str], stop: "_StopSignals",
               settings, sock) -> int:
    """--local: one in-process engine, no Ray."""
    from coserve.api.backend import LocalBackend

    try:
        backend = LocalBackend.start(args.model, **engine_kwargs)
    except (ValueError, FileNotFoundError) as exc:
        return _fail("serve", exc, EXIT_USAGE)
    except Exception as exc:
        return _fail("serve", exc, EXIT_FAILED)
    return _serve_backend(backend, adapters, stop, settings, sock, "coserve local engine",
                          lambda: f"ready on {backend.llm.engine.device}")


def _run_deployment(args: argparse.Namespace, engine_kwargs: dict, adapters: dict[str, str],
                    stop: "_StopSignals", settings, sock) -> int:
    from cluster import Deployment
    from cluster.errors import PlacementError
    from coserve.api.backend import ClusterBackend

    try:
        # Ray is joined already (ray_address None = that instance); a signal meanwhile only sets `stop`.
        dep = Deployment.start(model=args.model, num_workers=args.workers, name=args.name, ray_address=None,
                               mode=args.mode, use_gpu=args.use_gpu, gpus_per_worker=args.gpus_per_worker,
                               cpus_per_worker=args.cpus_per_worker, directory=args.directory, **engine_kwargs)
    except (ValueError, PlacementError, FileNotFoundError) as exc:
        return _fail("serve", exc, EXIT_USAGE)
    except Exception as exc:
        return _fail("serve", exc, EXIT_FAILED)
    try:
        backend = ClusterBackend(dep, args.model, max_model_len=engine_kwargs.get("max_model_len"))
    except Exception as exc:
        dep.shutdown()
        return _fail("serve", f"the HTTP server did not start: {exc}", EXIT_FAILED)

    def ready() -> str:
        workers = dep.workers()
        placed = ", ".join(f"{w['name']} on {w['device']}" for w in workers)
        return f"ready: {len(workers)} worker(s) [{placed}]"

    return _serve_backend(backend, adapters, stop, settings, sock, f"coserve deployment {args.name!r}", ready)


def _serve_backend(backend, adapters: dict[str, str], stop: "_StopSignals", settings, sock, label: str,
                   ready) -> int:
    """Load --lora-modules, start HTTP, print the ready line, serve until a signal, then stop both.

    NOTE: the HTTP server starts before the ready line (so the line means requests are accepted) and
    stops before the backend, so no request reaches engines that are going away.
    """
    server = None
    try:
        for adapter, path in adapters.items():
            if stop.requested:
                break
            try:
                backend.load_adapter(adapter, path)
            except (ValueError, KeyError, OSError) as exc:
                return _fail("serve", f"adapter {adapter!r} from {path}: {exc}", EXIT_USAGE)
        if not stop.requested:
            try:
                server = _start_http(backend, settings, adapters, sock)
            except Exception as exc:
                return _fail("serve", f"the HTTP server did not start: {exc}", EXIT_FAILED)
            loaded = f"; adapters: {', '.join(sorted(adapters))}" if adapters else ""
            _say(f"{label} {ready()}{loaded}; model {settings.model_id!r} at {server.url}/v1")
        while not stop.wait(3600.0):
            pass
        _say(f"{label}: {stop.name} received, shutting down")
        return EXIT_OK
    finally:
        if server is not None:
            server.stop()
        backend.shutdown()
        _say(f"{label} stopped")


def _parse_lora_modules(items: list[str]) -> dict[str, str]:
    adapters: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules takes NAME=PATH items, got {item!r}")
        if name in adapters:
            raise ValueError(f"--lora-modules names adapter {name!r} twice")
        if not os.path.isdir(path):
            raise ValueError(f"--lora-modules {item}: {path!r} is not a directory (a PEFT adapter directory)")
        adapters[name] = os.path.abspath(path)
    return adapters


# ---- coserve finetune ------------------------------------------------------------------------------


def _finetune(args: argparse.Namespace) -> int:
    from cluster.job_config import load_job_config
    from coserve.finetune.dataset import load_rows

    try:
        config = load_job_config(args.job)
        # NOTE: read the dataset here (as Deployment.finetune would) so a bad file fails before joining Ray.
        if isinstance(config.dataset, (str, os.PathLike)):
            config = dataclasses.replace(config, dataset=load_rows(config.dataset))
        address = _ray_address(args.ray_address)
    except ValueError as exc:
        return _fail("finetune", exc, EXIT_USAGE)

    from cluster import Deployment
    from cluster.errors import DeploymentNotFoundError
    from cluster.routing import NoWorkerError

    stop = _StopSignals()
    stop.install()
    try:
        dep = Deployment.connect(args.deployment, ray_address=address)
    except (DeploymentNotFoundError, ConnectionError, ValueError) as exc:
        return _fail("finetune", exc, EXIT_USAGE)
    except Exception as exc:   # e.g. Ray's AuthenticationError: a message, not a traceback
        return _fail("finetune", f"cannot join Ray at {address or 'auto'}: {exc}", EXIT_FAILED)
    stop.install()   # after ray.init, which replaces the SIGTERM handler
    if stop.requested:
        return EXIT_INTERRUPTED
    try:
        job = dep.finetune(config, worker=args.worker)
    except (ValueError, KeyError, TypeError, NoWorkerError) as exc:
        return _fail("finetune", exc, EXIT_USAGE)
    record = job.progress()
    _say(f"job {job.job_id}: adapter {config.adapter!r}, {config.max_steps} steps on worker {record['worker']} "
         f"of deployment {args.deployment!r}")
    if args.no_wait:
        return EXIT_OK
    try:
        return _follow(dep, job, config.max_steps, stop)
    except Exception as exc:   # the controller stayed unreachable (Deployment retries reads for a while)
        return _fail("finetune", f"lost track of job {job.job_id}: {exc}", EXIT_FAILED)


def _follow(dep, job, max_steps: int, stop: "_StopSignals") -> int:
    """Print each completed step until the job ends (its exit code) or a signal cancels it."""
    from cluster.job_handle import TERMINAL

    num_printed, attempts = 0, None
    while not stop.requested:
        record = job.progress()
        if attempts is not None and record["attempts"] != attempts:
            num_printed = min(num_printed, record["step"])
            _say(f"job {job.job_id}: its worker was lost; restarted on {record['worker']} at step {record['step']}")
        attempts = record["attempts"]
        num_done = min(record["step"], len(record["losses"]))
        if num_done > num_printed:
            rate = _tokens_per_s(dep, record)
            for step in range(num_printed + 1, num_done + 1):
                _say(f"step {step}/{max_steps} loss {record['losses'][step - 1]:.4f} "
                     f"tokens/s {rate} worker {record['worker']}")
            num_printed = num_done
        if record["status"] in TERMINAL:
            return _report_end(job.job_id, record)
        stop.wait(POLL_S)
    return _cancel(job, stop)


def _tokens_per_s(dep, record: dict) -> str:
    """Tokens trained per second since the job started on its worker ("n/a" when unknown).

    NOTE: the controller's job record has no token count; the worker's engine stats have one per engine job,
    with its start and end times (worker clock; a job restarted elsewhere starts counting again).
    """
    try:
        jobs = dep.stats()["workers"][record["worker"]]["finetune"]["jobs"]
        progress = jobs[record["engine_job_id"]]
        seconds = (progress["finished_at"] or time.time()) - progress["started_at"]
        return f"{progress['tokens_trained'] / max(seconds, 1e-6):.1f}"
    except Exception:   # a stats hiccup (or a job not started yet) must not end the progress display
        return "n/a"


def _report_end(job_id: str, record: dict) -> int:
    if record["status"] == "succeeded":
        last = f"; final loss {record['losses'][-1]:.4f}" if record["losses"] else ""
        _say(f"job {job_id} succeeded: adapter {record['adapter']!r} saved to {record['output_dir']} and "
             f"served by the deployment{last}")
        return EXIT_OK
    reason = f": {record['error']}" if record.get("error") else ""
    print(f"job {job_id} {record['status']} at step {record['step']}{reason}", file=sys.stderr, flush=True)
    return EXIT_FAILED


def _cancel(job, stop: "_StopSignals") -> int:
    """A signal arrived while waiting: cancel the job (the deployment keeps serving)."""
    _say(f"job {job.job_id}: {stop.name} received, cancelling")
    try:
        job.cancel()
        status = job.wait(timeout=CANCEL_WAIT_S)
    except Exception as exc:
        print(f"job {job.job_id}: cancel failed: {exc}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    _say(f"job {job.job_id} {status}")
    return EXIT_INTERRUPTED


# ---- shared ----------------------------------------------------------------------------------------


class _StopSignals:
    """SIGINT and SIGTERM set a flag that the command checks between steps.

    NOTE: handlers never raise, so a signal cannot cut a deployment's start or
    shutdown in half (a half-started deployment leaves detached actors behind).
    """

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = self.signum or signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "no signal"

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`, returning early (True) once a signal arrived."""
        deadline = time.monotonic() + seconds
        while not self.requested and time.monotonic() < deadline:
            # NOTE: short sleeps: a handler runs when the sleep is interrupted, but the sleep then resumes.
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        return self.requested


def _ray_address(flag: str | None) -> str | None:
    """--ray-address, else $RAY_ADDRESS (Ray sets it for a job's entrypoint), else None."""
    address = flag if flag is not None else (os.environ.get("RAY_ADDRESS") or None)
    if address is not None and address.startswith(("http://", "https://")):
        source = "--ray-address" if flag is not None else "RAY_ADDRESS"
        raise ValueError(f"{source}={address} is a dashboard (job submission) address; give the cluster's "
                         f"HOST:PORT (the `ray start --head --port`, 6379 by default) or 'auto'")
    return address


def _say(line: str) -> None:
    # NOTE: flushed at once: under `ray job submit` stdout is a file and `ray job logs` shows what was flushed.
    print(line, flush=True)


def _fail(command: str, error, code: int) -> int:
    print(f"coserve {command}: error: {error}", file=sys.stderr, flush=True)
    return code
