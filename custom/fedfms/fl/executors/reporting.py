"""The client's executor: NVFlare's ``ModelLearnerExecutor``, with failures the server can read.

NVFlare answers a task whose learner raised with a bare ``EXECUTION_EXCEPTION``: the server's
records say only that, while the reason sits in the site's log. :class:`ReportingLearnerExecutor`
puts the error message the executor logs (as NVFlare formats it: in secure mode only the
exception's type) into the failed reply's ``SITE_ERROR`` header, which the server's records show.
A learner that cannot initialise (e.g. the site's ``dataset_dir`` is missing) fails every later
task at once with the same message, instead of a new traceback per task.

While a task runs, a watch thread asks the server whether its run goes on (an aux message that
the server's :class:`~fedfms.fl.checks.liveness.RunPresence` answers; the executor answers the server's
own probes, :class:`~fedfms.fl.checks.liveness.SiteWatch`, the same way). When the server says its run
is over, or has not answered ``server_check_misses`` times in a row, a task still running here
works for nobody: the site's job process ends, so a hung site cannot keep the simulator (which
waits for every site's process) from exiting. A deployed site's parent process would stop it in
the same situation.
"""

from __future__ import annotations

import os
import threading

from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReturnCode, Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.executors.model_learner_executor import ModelLearnerExecutor

from nvflare.apis.event_type import EventType

from fedfms.fl.checks.liveness import LIVENESS_TOPIC, NO_ANSWER, RUN_STATE, answer_probe

#: Header of a failed task's reply: the site's error message.
SITE_ERROR = "fedfms_site_error"
#: Exit status of a site's job process that stopped because the server no longer answers.
SERVER_GONE_EXIT = 75


def site_error(reply: Shareable) -> str | None:
    """The error message a site put in its failed reply, if any."""
    return reply.get_header(SITE_ERROR)


class ReportingLearnerExecutor(ModelLearnerExecutor):
    """``ModelLearnerExecutor`` whose failed replies carry the site's error message, and which stops when the server is gone.

    Args:
        server_check_interval: seconds between the checks that the server still answers, while a
            task runs (0: never check).
        server_check_timeout: seconds a check waits for the server's answer.
        server_check_misses: unanswered checks in a row after which the site's job process ends.
        args, kwargs: ``ModelLearnerExecutor`` arguments (``learner_id``, task names).
    """

    def __init__(
        self, *args, server_check_interval: float = 10.0, server_check_timeout: float = 10.0, server_check_misses: int = 3, **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        if server_check_interval < 0 or server_check_timeout <= 0 or server_check_misses < 1:
            raise ValueError("need server_check_interval >= 0, server_check_timeout > 0 and server_check_misses >= 1")
        self.server_check_interval = server_check_interval
        self.server_check_timeout = server_check_timeout
        self.server_check_misses = server_check_misses
        self._last_error: str | None = None
        self._setup_error: str | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        super().handle_event(event_type, fl_ctx)
        if event_type == EventType.START_RUN:
            fl_ctx.get_engine().register_aux_message_handler(topic=LIVENESS_TOPIC, message_handle_func=answer_probe)

    def log_exception(self, fl_ctx: FLContext, msg: str, fire_event: bool = False) -> None:
        self._last_error = msg  # the executor logs every learner failure here, before it replies
        super().log_exception(fl_ctx, msg, fire_event=fire_event)

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if self._setup_error:
            self.log_error(fl_ctx, f"not running task {task_name}: {self._setup_error}")
            return _failed(self._setup_error)
        self._last_error = None
        done = threading.Event()
        if self.server_check_interval:
            threading.Thread(target=self._watch_server, args=(fl_ctx.get_engine(), task_name, done), daemon=True).start()
        try:
            reply = super().execute(task_name, shareable, fl_ctx, abort_signal)
        except Exception as e:  # the learner's initialize failed (logged by the base class)
            self._setup_error = self._last_error or f"{type(e).__name__}: {e}"
            return _failed(self._setup_error)
        finally:
            done.set()
        if reply.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            reply.set_header(SITE_ERROR, self._last_error or f"task {task_name} failed (see the site's log)")
        return reply

    def _watch_server(self, engine, task_name: str, done: threading.Event) -> None:
        """While the task runs: end this process once the server has stopped answering."""
        missed = 0
        while not done.wait(self.server_check_interval):
            with engine.new_context() as fl_ctx:
                replies = engine.send_aux_request(
                    targets=["server"], topic=LIVENESS_TOPIC, request=Shareable(), timeout=self.server_check_timeout, fl_ctx=fl_ctx, optional=True
                ) or {}
                reply = next(iter(replies.values()), None)
                code = reply.get_return_code(ReturnCode.OK) if reply is not None else "no reply"
                missed = missed + 1 if reply is None or code in NO_ANSWER else 0
                over = reply is not None and reply.get_header(RUN_STATE) == "over"
                if (over or missed >= self.server_check_misses) and not done.is_set():
                    why = "the server's run is over" if over else f"the server did not answer {missed} checks ({code})"
                    self.log_error(fl_ctx, f"{why} while task {task_name} ran: it works for nobody; ending this site's job process")
                    os._exit(SERVER_GONE_EXIT)


def _failed(message: str) -> Shareable:
    reply = make_reply(ReturnCode.EXECUTION_EXCEPTION)
    reply.set_header(SITE_ERROR, message)
    return reply
