"""Run ftcluster on an existing Ray cluster as a Ray job: upload this checkout, start the driver on the head node,
stream its log here, and exit with the job's outcome.

    python -m launchers.submit --address http://HEAD:8265 --config configs/llama2_7b_lora.yaml [override ...]

It is ``ray job submit`` with the runtime environment filled in; ``--print-command`` prints that command instead
of running it. Options:

* the working directory is this checkout, without what a job never needs (virtual environments, runs, reports'
  images, wheels, git history), so that the upload stays small (Ray refuses a package over 500 MiB);
* environment variables: HF_TOKEN, HF_HOME, HF_HUB_OFFLINE, HF_DATASETS_OFFLINE, TRANSFORMERS_OFFLINE,
  WANDB_API_KEY and NCCL_* / FTC_* are passed on when set here, and ``--env KEY=VALUE`` adds any other;
* ``ray job stop`` (and Ctrl-C here, with ``--stop-on-interrupt``) sends the driver SIGTERM: the run saves a
  checkpoint and stops. ``RAY_JOB_STOP_WAIT_TIME_S`` (``--stop-wait``, default 120 s) is how long Ray lets it
  before SIGKILL; Ray's own default, 3 s, would lose the step.

Ray 2.60 clusters authenticate by token: this sets ``RAY_AUTH_MODE=token`` unless you set it, and Ray reads the
token from ``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token`` (copy it from the head node).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXCLUDES = [".git", ".venv", "venv", ".whl", ".stage", "runs", "reports/**/*.png", "**/__pycache__", "*.safetensors",
            "*.bin", "*.gguf", "*.pt", "*.whl"]
PASSED_ON = ["HF_TOKEN", "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "WANDB_API_KEY"]
PASSED_ON_PREFIXES = ("NCCL_", "FTC_")
EXIT = {"SUCCEEDED": 0, "STOPPED": 75, "FAILED": 1}


def runtime_env(extra_env: list[str], stop_wait_s: int, environ: dict[str, str] = os.environ) -> dict:
    env = {k: v for k, v in environ.items() if k in PASSED_ON or k.startswith(PASSED_ON_PREFIXES)}
    for item in extra_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    env["RAY_JOB_STOP_WAIT_TIME_S"] = str(stop_wait_s)
    return {"working_dir": str(ROOT), "excludes": EXCLUDES, "env_vars": env}


def inside_checkout(config: str) -> Path:
    """``config`` as a path relative to the checkout (given relative to it, or absolute inside it): the job runs from
    an upload of the checkout, where only such a path exists."""
    path = Path(config)
    if path.is_absolute():
        try:
            path = path.resolve().relative_to(ROOT.resolve())
        except ValueError:
            pass
    if path.is_absolute() or not (ROOT / path).is_file():
        raise SystemExit(f"--config {config}: not a file inside {ROOT}; the job runs from an upload of this "
                         "checkout, so the recipe must be in it (e.g. configs/llama2_7b_lora.yaml)")
    return path


def entrypoint(config: str, overrides: list[str]) -> str:
    return shlex.join(["python", "-m", "ftcluster.train", "--config", config, *overrides])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launchers.submit", description=__doc__.splitlines()[0])
    p.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS"),
                   help="the cluster's dashboard, e.g. http://10.0.0.1:8265 (default: RAY_API_SERVER_ADDRESS, "
                        "then RAY_ADDRESS)")
    p.add_argument("--config", required=True, help="the recipe, a path inside this checkout")
    p.add_argument("overrides", nargs="*", help="dotted overrides for the driver, e.g. training.max_steps=100")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="another environment variable")
    p.add_argument("--submission-id", help="the job's id (default: ftc-<recipe>-<time>)")
    p.add_argument("--stop-wait", type=int, default=120, help="seconds `ray job stop` gives the run to checkpoint")
    p.add_argument("--no-wait", action="store_true", help="submit and return; follow with `ray job logs -f ID`")
    p.add_argument("--stop-on-interrupt", action="store_true", help="Ctrl-C here stops the job (else it detaches)")
    p.add_argument("--print-command", action="store_true", help="print the equivalent `ray job submit` and exit")
    return p


def unanswered(address: str, timeout_s: float = 10.0) -> str | None:
    """Why no HTTP server answers at a dashboard address, or None if one does (whatever its status: a cluster that
    wants a token answers 401). A ``ray://`` address is left to Ray's client."""
    import urllib.error
    import urllib.request

    if address.startswith("ray://"):
        return None
    url = (address if "://" in address else f"http://{address}").rstrip("/") + "/api/version"
    try:
        urllib.request.urlopen(url, timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as e:
        return str(getattr(e, "reason", e))
    return None


def no_dashboard(address: str, why: str) -> int:
    print(f"error: --address {address}: no Ray dashboard answered ({why}). Check that the cluster is up (`ray "
          "status` on its head node) and that this machine reaches the dashboard's port (8265 unless `ray start "
          "--dashboard-port` changed it).", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not args.address:
        raise SystemExit("--address: give the cluster's dashboard address, e.g. http://10.0.0.1:8265")
    config = inside_checkout(args.config)
    if not re.match(r"^((https?|ray)://)?[\w.\-]+(:\d+)?/?$", args.address):
        raise SystemExit(f"--address {args.address}: not a dashboard address; give it as http://HOST:8265 (the head "
                         "node's dashboard, `ray status` there shows it)")
    # A wrong override fails here, naming the field, not minutes later on the cluster.
    from ftcluster import config as C

    try:
        C.load(ROOT / config, args.overrides)
    except C.ConfigError as e:
        raise SystemExit(f"error: {e}") from None

    env = runtime_env(args.env, args.stop_wait)
    command = entrypoint(str(config), args.overrides)
    submission_id = args.submission_id or f"ftc-{config.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.print_command:
        print(shlex.join(["ray", "job", "submit", "--address", args.address, "--submission-id", submission_id,
                          "--runtime-env-json", json.dumps(env), "--", *shlex.split(command)]))
        return 0

    # Asked first whether anything answers there: with no token on this machine, Ray's client refuses before it
    # connects, and an address with no cluster behind it would read as a refused token.
    silent = unanswered(args.address)
    if silent:
        return no_dashboard(args.address, silent)
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(args.address)
        job = client.submit_job(entrypoint=command, runtime_env=env, submission_id=submission_id)
    except AuthenticationError as e:
        print(f"error: the cluster at {args.address} refused this client: {e}\nCopy the head node's "
              "~/.ray/auth_token here, or set RAY_AUTH_TOKEN.", file=sys.stderr)
        return 2
    except (ConnectionError, ValueError) as e:
        return no_dashboard(args.address, str(e).splitlines()[0] if str(e) else type(e).__name__)
    print(f"submitted {job} to {args.address}: {command}", flush=True)
    if args.no_wait:
        print(f"follow: ray job logs -f --address {args.address} {job}\nstop (checkpoints first): "
              f"ray job stop --address {args.address} {job}")
        return 0

    async def tail() -> None:
        async for lines in client.tail_job_logs(job):
            print(lines, end="", flush=True)

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        if not args.stop_on_interrupt:
            print(f"\ndetached; the job runs on. stop it with: ray job stop --address {args.address} {job}")
            return 130
        client.stop_job(job)
        print(f"\nstopping {job}: the run saves a checkpoint first", flush=True)
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        time.sleep(1)
    info = client.get_job_info(job)
    print(f"job {job}: {status.value}{f' ({info.message})' if info.message else ''}", flush=True)
    # A run that stopped early with a checkpoint exits 75 inside the job, which Ray records as FAILED.
    if status == JobStatus.FAILED and info.driver_exit_code == 75:
        return 75
    return EXIT.get(status.value, 1)


if __name__ == "__main__":
    sys.exit(main())
