"""submit --wait: every final state ends the wait, --timeout bounds it, KFP_TOKEN authenticates; API and
health-check errors read as one line naming the cause.

Against the same local HTTP server speaking the KFP v2beta1 API as tests/test_kubeflow_submit.py.
"""
import socket
import threading

import pytest

from pneumonia_kfp.pipelines.cli import main
from tests import test_kubeflow_submit as base
from tests.conftest import free_port
from tests.test_kubeflow_submit import S3, TOKEN, one_error_line

# the same fake KFP API server and clean-process fixture as the other submit tests
kfp_api = base.kfp_api
clean_process_state = base.clean_process_state


def submit(kfp_api, *args):
    return main(["submit", "--host", kfp_api.url, "--poll-seconds", "0.01", *args])


def polls(server) -> int:
    return sum(r["path"] == "/apis/v2beta1/runs/run-1" and r["method"] == "GET" for r in server.requests)


@pytest.mark.parametrize("final", ["FAILED", "CANCELED", "SKIPPED"])
def test_wait_ends_on_every_final_state_and_exits_1(kfp_api, capsys, final):
    kfp_api.states = ["PENDING", "RUNNING", final]
    # a state the wait does not know as final would keep it polling until the timeout: exit 2, not 1
    assert submit(kfp_api, *S3, "--wait", "--timeout", "30") == 1
    assert f"run run-1 finished {final}" in one_error_line(capsys)
    assert polls(kfp_api) == 3  # exactly until the final state, then no more (not until the timeout)


def test_wait_prints_each_new_state_once(kfp_api, capsys):
    kfp_api.states = ["PENDING", "PENDING", "RUNNING", "RUNNING", "SUCCEEDED"]
    assert submit(kfp_api, *S3, "--wait") == 0
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if line.startswith("run run-1:")] == [
        "run run-1: PENDING", "run run-1: RUNNING", "run run-1: SUCCEEDED"]
    assert out[-1] == "run-1" and polls(kfp_api) == 5


@pytest.mark.parametrize("state", ["RUNNING", "PAUSED", "CANCELING"])
def test_timeout_stops_waiting_on_a_run_that_does_not_finish(kfp_api, capsys, state):
    kfp_api.states = [state]  # forever
    assert submit(kfp_api, *S3, "--wait", "--timeout", "0.5") == 2
    err = one_error_line(capsys)
    assert f"run run-1 still {state} after 0 s (--timeout); it keeps running" in err
    assert polls(kfp_api) >= 2  # polled until the deadline, then gave up


def test_without_wait_there_is_no_polling(kfp_api, capsys):
    kfp_api.states = ["RUNNING"]
    assert submit(kfp_api, *S3, "--timeout", "0") == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "run-1" and polls(kfp_api) == 0


def test_kfp_token_from_the_environment(kfp_api, capsys, monkeypatch):
    kfp_api.token = TOKEN
    monkeypatch.setenv("KFP_TOKEN", TOKEN)
    assert submit(kfp_api, *S3, "--wait") == 0
    assert kfp_api.requests and all(r["auth"] == f"Bearer {TOKEN}" for r in kfp_api.requests)


def test_token_flag_beats_kfp_token(kfp_api, capsys, monkeypatch):
    kfp_api.token = TOKEN
    monkeypatch.setenv("KFP_TOKEN", "stale-token")
    assert submit(kfp_api, *S3, "--token", TOKEN) == 0
    assert all(r["auth"] == f"Bearer {TOKEN}" for r in kfp_api.requests)


def test_a_refused_kfp_token_is_named_as_refused_not_missing(kfp_api, capsys, monkeypatch):
    kfp_api.token = TOKEN
    monkeypatch.setenv("KFP_TOKEN", "expired-token")
    assert submit(kfp_api, *S3) == 2
    err = one_error_line(capsys)
    assert "refused the request (HTTP 401): the token was refused" in err and "expired-token" not in err


def test_an_api_error_without_json_names_the_http_reason(kfp_api, capsys):
    kfp_api.fail["POST /apis/v2beta1/runs"] = (500, "upstream connect error")
    assert submit(kfp_api, *S3) == 2
    assert one_error_line(capsys).endswith("answered HTTP 500: Internal Server Error")


def test_an_api_error_with_an_error_field_only(kfp_api, capsys):
    kfp_api.fail["POST /apis/v2beta1/runs"] = (409, {"error": "run already exists\nstack trace"})
    assert submit(kfp_api, *S3) == 2
    assert one_error_line(capsys).endswith("answered HTTP 409: run already exists")


def test_forbidden_run_creation_names_the_token(kfp_api, capsys):
    kfp_api.token = TOKEN
    kfp_api.fail["POST /apis/v2beta1/runs"] = (403, {"error": "PermissionDenied"})
    assert submit(kfp_api, *S3, "--token", TOKEN) == 2
    err = one_error_line(capsys)
    assert "refused the request (HTTP 403): the token was refused" in err and TOKEN not in err


def test_health_check_server_error(kfp_api, capsys):
    kfp_api.fail["GET /apis/v2beta1/healthz"] = (503, {})
    assert submit(kfp_api, *S3) == 2
    err = one_error_line(capsys)
    assert "is not a Kubeflow Pipelines API: GET /apis/v2beta1/healthz answered HTTP 503" in err
    assert len(kfp_api.requests) == 1


def test_an_unauthorised_api_call_after_the_health_check_names_the_missing_token(kfp_api, capsys):
    kfp_api.fail["POST /apis/v2beta1/runs"] = (401, {"error": "Unauthorized"})
    assert submit(kfp_api, *S3) == 2
    assert f"error: {kfp_api.url} refused the request (HTTP 401): no token was sent" in one_error_line(capsys)


def test_an_api_error_whose_json_has_no_message_names_the_http_reason(kfp_api, capsys):
    kfp_api.fail["POST /apis/v2beta1/runs"] = (500, {"code": 13})
    assert submit(kfp_api, *S3) == 2
    assert one_error_line(capsys).endswith("answered HTTP 500: Internal Server Error")


def test_a_long_api_message_is_cut_to_300_characters(kfp_api, capsys):
    kfp_api.fail["POST /apis/v2beta1/runs"] = (400, {"message": "x" * 400})
    assert submit(kfp_api, *S3) == 2
    assert one_error_line(capsys).endswith("answered HTTP 400: " + "x" * 300)


def test_an_api_error_without_message_or_reason_says_nothing_more(kfp_api, capsys):
    kfp_api.fail["POST /apis/v2beta1/runs"] = (599, "")  # no standard reason phrase: the status line has none
    assert submit(kfp_api, *S3) == 2
    assert one_error_line(capsys).endswith("answered HTTP 599:")


def test_the_health_check_does_not_retry_a_dropped_connection(capsys):
    """A host that accepts and hangs up at once: one connection, then one line (no silent retries)."""
    port, accepted = free_port(), []
    server = socket.create_server(("127.0.0.1", port))

    def hang_up():
        server.settimeout(0.2)
        while True:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted.append(1)
            conn.close()

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    try:
        assert main(["submit", "--host", f"http://127.0.0.1:{port}", *S3]) == 2
        assert "cannot reach Kubeflow Pipelines" in one_error_line(capsys)
    finally:
        server.close()
        thread.join(2)
    assert len(accepted) == 1
