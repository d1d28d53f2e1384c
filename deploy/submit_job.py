"""Submit a job folder to a provisioned NVFlare project with the FLARE API, wait, download the result.

    python submit_job.py ADMIN_KIT JOB_FOLDER [--timeout SECONDS] [--admin NAME]

ADMIN_KIT is the admin's startup kit (e.g. .../prod_00/admin@fedfms.org); the admin's name is the
kit's folder name unless --admin gives it. Prints the job id, its final status and where the result was downloaded
(<ADMIN_KIT>/transfer/<job id>); `fedfms report` reads that folder. Exits 1 unless the job
finished FINISHED:COMPLETED, which still does not prove every site contributed: the report does.
"""

import argparse
import sys
from pathlib import Path

from nvflare.fuel.flare_api.flare_api import new_secure_session


def submit(admin_kit: Path, job_folder: Path, timeout: float, admin: str | None = None) -> str:
    """The job's final status; the session is closed whatever happens (an open one keeps Python alive)."""
    # The FLARE API resolves a relative job path inside the kit's transfer/ folder: pass it absolute.
    job_folder, admin_kit = job_folder.resolve(), admin_kit.resolve()
    session = new_secure_session(admin or admin_kit.name, str(admin_kit), timeout=60)
    try:
        job_id = session.submit_job(str(job_folder))
        print(f"job id: {job_id}", flush=True)
        outcome = session.monitor_job(job_id, timeout=timeout, poll_interval=2.0)
        status = session.get_job_meta(job_id)["status"]
        print(f"monitor: {outcome.name}, status: {status}", flush=True)
        if outcome.name == "TIMEOUT":
            session.abort_job(job_id)  # do not leave it running unattended
            return status
        print(f"result: {session.download_job_result(job_id)}", flush=True)
        return status
    finally:
        session.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("admin_kit", type=Path, help="the admin's startup kit folder")
    parser.add_argument("job_folder", type=Path, help="the job folder to submit, e.g. one written by `fedfms job`")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the job to end (then it is aborted)")
    parser.add_argument("--admin", help="the admin's name in the project (default: the kit's folder name)")
    args = parser.parse_args(argv)
    return 0 if submit(args.admin_kit, args.job_folder, args.timeout, args.admin) == "FINISHED:COMPLETED" else 1


if __name__ == "__main__":
    sys.exit(main())
