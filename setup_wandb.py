"""Set up Weights & Biases logging for `distill.py --use_wandb`: log in once, or log offline.

    python setup_wandb.py                  # log in: asks for your API key (or reads WANDB_API_KEY)
    python setup_wandb.py --test           # ... and log a tiny test run
    python setup_wandb.py --offline --test # no account or no network: runs are written locally

The API key is handed to wandb.login, which keeps it where wandb always does (~/.netrc); this
script never prints it or writes it anywhere else. A self-hosted server is chosen with
WANDB_BASE_URL.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys

import requests
import wandb

from pepemb import cli
from pepemb.cli import UserError

TEST_PROJECT = "pepemb-setup-test"
NEXT_STEP = (
    "python distill.py --data_path data/antibody_sample.fasta --teacher_model antiberty "
    "--use_wandb --wandb_project pepemb-distill"
)
OFFLINE_MODES = {"offline", "dryrun", "disabled"}
REACH_TIMEOUT_S = 4.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "--offline",
        action="store_true",
        help="no login: make every W&B run write locally (upload later with `wandb sync`)",
    )
    p.add_argument("--test", action="store_true", help="after setting up, log a tiny run and report where it went")
    p.add_argument("--relogin", action="store_true", help="ask for a new API key even if one is stored (terminal only)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.offline:
        settings_file = set_offline_mode()
        print(
            f"W&B is now in offline mode ({settings_file}): each run writes a local "
            f"wandb/offline-run-* folder (distill.py: inside its --output_dir) and uploads nothing.\n"
            f"Upload a run later with `wandb sync <that folder>`; go back online with "
            f"`python setup_wandb.py`, or for one command with WANDB_MODE=online."
        )
    else:
        log_in(relogin=args.relogin)
    if args.test:
        print(f"test run: {run_test(offline=args.offline)}")
    print(f"next: {NEXT_STEP}")


# --------------------------------------------------------------------------------------------
# Offline
# --------------------------------------------------------------------------------------------


def set_offline_mode() -> str:
    """`wandb offline`, but in the user's settings file rather than ./wandb/settings, so that it
    holds for every folder distill.py runs in. Returns the settings file's path."""
    settings = wandb.setup().settings
    files = settings.read_system_settings()
    files.set("mode", "offline", globally=True)
    files.save()
    return settings.settings_system


# --------------------------------------------------------------------------------------------
# Log in
# --------------------------------------------------------------------------------------------


def log_in(relogin: bool = False) -> None:
    """Find an API key (WANDB_API_KEY, stored, or typed), check the server answers, log in and
    verify; then leave offline mode if a settings file had chosen it."""
    if os.environ.get("WANDB_MODE", "").lower() in OFFLINE_MODES:
        raise UserError(
            f"WANDB_MODE={os.environ['WANDB_MODE']} is set in your environment, so W&B "
            "will not log in: unset WANDB_MODE, or run python setup_wandb.py --offline"
        )
    # Logging in is refused while a settings file says offline: override it for this process,
    # and clear the file only once the login has succeeded.
    settings = wandb.setup(settings=wandb.Settings(mode="online")).settings
    key = find_api_key(settings, relogin)
    check_reachable(settings.base_url)
    try:
        wandb.login(key=key, verify=True, prompt=False)
    except (wandb.errors.Error, ValueError) as err:
        raise UserError(f"W&B login failed: {without_key(err, key)}") from None
    files = settings.read_system_settings()
    if files.all().get("mode") in OFFLINE_MODES:
        files.clear("mode", globally=True)
        files.save()
        print("W&B offline mode switched off: runs upload again")
    print(f"W&B login verified with {settings.base_url}")


def find_api_key(settings, relogin: bool) -> str | None:
    """The key to log in with: WANDB_API_KEY, else None when wandb already stores credentials,
    else one typed at a hidden prompt (terminal only)."""
    key = os.environ.get("WANDB_API_KEY", "").strip()
    if key:
        return key
    if not relogin and wandb.login(prompt=False, verify=False):
        return None
    if not sys.stdin.isatty():
        raise UserError(
            "no W&B API key: run python setup_wandb.py in a terminal to type it, or set "
            "WANDB_API_KEY; without an account use python setup_wandb.py --offline"
        )
    print(
        f"Weights & Biases shows training curves in the browser; a free account is enough.\n"
        f"  1. Sign up or log in at {settings.app_url.rstrip('/')}/authorize: the page shows "
        f"your API key.\n"
        f"  2. Paste it below. Typing is hidden; the key is stored by wandb in ~/.netrc."
    )
    key = getpass.getpass("W&B API key: ").strip()
    if not key:
        raise UserError("no API key entered; run python setup_wandb.py again")
    return key


def check_reachable(base_url: str) -> None:
    """Fail in seconds, in one line, when the server cannot be reached: wandb's own login
    retries for long and then reports a busy internal service."""
    try:
        requests.head(base_url, timeout=REACH_TIMEOUT_S, allow_redirects=False)
    except requests.RequestException as err:
        raise UserError(
            f"cannot reach the W&B server {base_url} ({type(err).__name__}); check "
            f"the network or proxy (or WANDB_BASE_URL), or log offline: "
            f"python setup_wandb.py --offline"
        ) from None


def without_key(err: Exception, key: str | None) -> str:
    """The error's message on one line, with the API key blanked out should it appear."""
    message = " ".join(str(err).split()) or type(err).__name__
    return message.replace(key, "<API key>") if key else message


# --------------------------------------------------------------------------------------------
# Test run
# --------------------------------------------------------------------------------------------


def run_test(offline: bool) -> str:
    """Log a few steps to a tiny run; returns its URL, or its folder when offline."""
    try:
        run = wandb.init(
            project=TEST_PROJECT,
            job_type="setup-test",
            name="setup-test",
            mode="offline" if offline else "online",
            config={"purpose": "setup_wandb.py --test"},
        )
        for step in range(5):
            run.log({"test/loss": 1.0 / (step + 1), "test/step": step}, step=step)
        where = run.settings.sync_dir if offline else run.url
        run.finish()
    except (wandb.errors.Error, OSError) as err:
        raise UserError(f"the W&B test run failed: {without_key(err, os.environ.get('WANDB_API_KEY'))}") from None
    return f"{where} (upload with: wandb sync {where})" if offline else where


if __name__ == "__main__":
    cli.run(main)
