"""/v1/files through the official `openai` client and raw HTTP: upload, list, content, delete, limits, restart.

Bad uploads must be refused whole with one OpenAI error object that names
every bad line and why; nothing is stored for them.
"""
import json

import httpx
import openai
import pytest

from coserve.api.file_store import FileStore

CHAT_ROWS = [{"messages": [{"role": "user", "content": f"What is code {i}?"},
                           {"role": "assistant", "content": f"Code {i} is blue."}]} for i in range(4)]


def jsonl(rows) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def upload(url: str, data: bytes, purpose: str = "fine-tune", filename: str = "data.jsonl", **kwargs):
    return httpx.post(f"{url}/v1/files", files={"file": (filename, data)}, data={"purpose": purpose}, **kwargs)


def test_upload_list_retrieve_content_delete(client):
    data = jsonl(CHAT_ROWS + [{"prompt": "2+2=", "completion": "4"}, {"text": "plain text row"}])
    created = client.files.create(file=("train.jsonl", data), purpose="fine-tune")
    assert created.id.startswith("file-") and created.object == "file"
    assert (created.bytes, created.filename, created.purpose, created.status) == (len(data), "train.jsonl",
                                                                                 "fine-tune", "processed")
    assert created.created_at > 0
    assert created.id in [f.id for f in client.files.list()]
    assert client.files.list(purpose="batch").data == []
    assert client.files.retrieve(created.id) == created
    assert client.files.content(created.id).content == data

    deleted = client.files.delete(created.id)
    assert deleted.deleted and deleted.id == created.id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)
    assert created.id not in [f.id for f in client.files.list()]


def test_list_pages_with_after_and_limit(client):
    ids = [client.files.create(file=(f"p{i}.jsonl", jsonl(CHAT_ROWS)), purpose="fine-tune").id for i in range(3)]
    first = client.files.list(limit=2, order="asc")
    assert first.has_more is True and len(first.data) == 2
    # The client's auto-pagination follows `after` through every page.
    listed = [f.id for f in client.files.list(limit=1, order="asc")]
    assert [i for i in listed if i in ids] == ids


def test_bad_lines_are_named_with_reasons(server):
    lines = [
        json.dumps(CHAT_ROWS[0]),                                              # 1 fine
        '{"messages": [{"role": "user", "content": "hi"}',                     # 2 not JSON
        "[1, 2]",                                                              # 3 not an object
        "",                                                                    # 4 blank: skipped
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),           # 5 no assistant
        json.dumps({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}),  # 6
        json.dumps({"prompt": "no completion"}),                               # 7
        json.dumps({"bogus": 1}),                                              # 8
        json.dumps({"text": "fine"}),                                          # 9 fine
    ]
    response = upload(server.url, "\n".join(lines).encode())
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "file" and error["code"] == "invalid_file_format"
    message = error["message"]
    for number, why in [(2, "not valid JSON"), (3, "a JSON list, not an object"), (5, "no assistant message"),
                        (6, "message 0 has role 'tool'"), (7, '"completion" must be a string'), (8, "no recognised fields")]:
        assert f"line {number}: {why}" in message, message
    assert "6 of 8 lines" in message
    for number in (1, 4, 9):
        assert f"line {number}:" not in message


def test_many_bad_lines_are_all_numbered(server):
    response = upload(server.url, b"\n".join([b"nope"] * 30))
    message = response.json()["error"]["message"]
    assert response.status_code == 400 and "30 of 30 lines" in message
    assert "line 20: not valid JSON" in message and "also bad: lines 21, 22" in message and "30" in message


def test_rows_the_loader_cannot_train_are_refused(server):
    # Structurally fine, but the loader finds no target token: its own reason comes through.
    no_targets = {"input_ids": [5, 6, 7], "labels": [-100, -100, -100]}
    weight_zero = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]}
    response = upload(server.url, jsonl([no_targets, weight_zero]))
    message = response.json()["error"]["message"]
    assert response.status_code == 400
    assert "line 1: no target tokens" in message and 'line 2: message 1 has "weight": 0' in message


def test_invalid_utf8_and_empty_files(server):
    response = upload(server.url, b'{"text": "ok"}\n\xff\xfe\n')
    assert response.status_code == 400 and "line 2: not UTF-8" in response.json()["error"]["message"]
    response = upload(server.url, b"\n\n")
    assert response.status_code == 400 and "has no rows" in response.json()["error"]["message"]


def test_only_fine_tune_purpose_is_accepted(server):
    response = upload(server.url, jsonl(CHAT_ROWS), purpose="assistants")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "purpose" and "'assistants'" in error["message"]
    response = httpx.post(f"{server.url}/v1/files", files={"file": ("d.jsonl", jsonl(CHAT_ROWS))})
    assert response.status_code == 400 and response.json()["error"]["param"] == "purpose"
    response = httpx.post(f"{server.url}/v1/files", data={"purpose": "fine-tune"}, files={"other": ("x", b"y")})
    assert response.status_code == 400 and response.json()["error"]["param"] == "file"
    response = httpx.post(f"{server.url}/v1/files", json={"purpose": "fine-tune"})
    assert response.status_code == 400 and "multipart/form-data" in response.json()["error"]["message"]


def test_uploads_over_the_limit_get_413(make_server):
    small = make_server(max_upload_bytes=300)
    ok = jsonl(CHAT_ROWS[:1])
    assert len(ok) < 300 and upload(small.url, ok).status_code == 200
    big = jsonl(CHAT_ROWS * 10)
    response = upload(small.url, big)   # declared Content-Length is within the slack: caught on the file part
    assert response.status_code == 413 and response.json()["error"]["param"] == "file"
    huge = jsonl(CHAT_ROWS * 2000)      # over the slack: refused from Content-Length, before reading
    assert upload(small.url, huge).status_code == 413

    # Without Content-Length (chunked), the body is counted as it streams in.
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.jsonl\"\r\n\r\n").encode()
    body += huge + f"\r\n--{boundary}--\r\n".encode()

    def chunks():
        for start in range(0, len(body), 4096):
            yield body[start:start + 4096]

    response = httpx.post(f"{small.url}/v1/files", content=chunks(),
                          headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413
    assert [f["filename"] for f in httpx.get(f"{small.url}/v1/files").json()["data"]] == ["data.jsonl"]


def test_unknown_and_malformed_file_ids_are_404(server):
    for path in ("file-" + "0" * 24, "file-nope", "..%2F..%2Fetc%2Fpasswd"):
        for method, suffix in (("GET", ""), ("GET", "/content"), ("DELETE", "")):
            response = httpx.request(method, f"{server.url}/v1/files/{path}{suffix}")
            assert response.status_code == 404, (method, path, suffix)
            # An encoded "/" splits the path, so that one never reaches the route (still an OpenAI 404 body).
            assert response.json()["error"]["param"] == (None if "%2F" in path else "file_id")


def test_bad_list_parameters(server):
    assert httpx.get(f"{server.url}/v1/files", params={"limit": 0}).json()["error"]["param"] == "limit"
    assert httpx.get(f"{server.url}/v1/files", params={"order": "up"}).json()["error"]["param"] == "order"
    response = httpx.get(f"{server.url}/v1/files", params={"after": "file-missing"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "after"


def test_files_need_the_api_key_when_one_is_set(make_server):
    secured = make_server(api_key="sekret")
    assert upload(secured.url, jsonl(CHAT_ROWS)).status_code == 401
    assert httpx.get(f"{secured.url}/v1/files").status_code == 401
    response = upload(secured.url, jsonl(CHAT_ROWS), headers={"Authorization": "Bearer sekret"})
    assert response.status_code == 200


def test_files_survive_a_restart(make_server, tmp_path):
    first = make_server(data_dir=tmp_path)
    kept = upload(first.url, jsonl(CHAT_ROWS), filename="kept.jsonl").json()
    gone = upload(first.url, jsonl(CHAT_ROWS), filename="gone.jsonl").json()
    assert httpx.delete(f"{first.url}/v1/files/{gone['id']}").json()["deleted"] is True
    first.stop()

    second = make_server(data_dir=tmp_path)
    listed = httpx.get(f"{second.url}/v1/files").json()["data"]
    assert listed == [kept]
    assert httpx.get(f"{second.url}/v1/files/{kept['id']}/content").content == jsonl(CHAT_ROWS)
    # No temporary files are left next to the index.
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == sorted(["index.json", kept["id"]])


def test_store_ignores_index_entries_whose_content_is_missing(tmp_path):
    store = FileStore(tmp_path)
    record = store.add(b'{"text": "x"}\n', "a.jsonl", "fine-tune")
    (tmp_path / record["id"]).unlink()
    assert FileStore(tmp_path).list() == []
