"""Command line for `appliance doctor`: why this machine can or cannot run what is configured.

The checks live in appliance/doctor.py; this module loads the settings, runs them and prints one
line per check. Exit status 1 when any check FAILs (something blocks), else 0.
"""

from __future__ import annotations

import sys

import click

from appliance.doctor import Check, failed, render, run_checks, to_json


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as a JSON list of {name, status, detail, fix}.")
@click.option("--full", is_flag=True, help="Also re-hash every model file against its manifest (reads them all).")
# The child process doctor starts to read llama.cpp's build: a PyInstaller binary has no `python -c`.
@click.option("--probe-cpu", is_flag=True, hidden=True)
@click.pass_context
def doctor(ctx: click.Context, as_json: bool, full: bool, probe_cpu: bool) -> None:
    """Check this machine against the configuration: CPU, memory, disk, data dir, models, GPU, port,
    clock, cluster peers and RPC workers. Exit 1 when something blocks."""
    if probe_cpu:
        from appliance.engines.llama import system_info  # may die with SIGILL: that is what the parent checks

        click.echo(system_info())
        return
    from appliance.cli_common import cli_settings

    try:
        settings = cli_settings(ctx)
    except click.UsageError as exc:
        checks = [Check(name="settings", status="FAIL", detail=exc.message,
                        fix="correct the setting named (config file, APPLIANCE_* variable or flag)")]
    else:
        checks = run_checks(settings, full=full)
    click.echo(to_json(checks) if as_json else render(checks))
    sys.exit(1 if failed(checks) else 0)


def register(main: click.Group) -> None:
    main.add_command(doctor)


if __name__ == "__main__":
    # `python -m appliance.cli_doctor --probe-cpu`: the child process doctor starts when run from source.
    doctor()
