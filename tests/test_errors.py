"""Errors carry fields; one table translates a store's and DALI's failures; the scheme registry drives storage
(issue 19). No server: obstore's in-memory and local stores, and failures built to read like the real ones."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest

from dali_arb.data import storage
from dali_arb.data.storage import SCHEMES, Backend, Fetcher, Request
from dali_arb.errors import (
    TABLE,
    ConfigError,
    DaliArbError,
    DataError,
    DeviceError,
    ObjectChanged,
    ObjectMissing,
    ResourceError,
    StorageError,
    dali_error_summary,
    is_out_of_memory,
    raised_by_dali_arb,
    translate,
)


def obstore_error(name: str, text: str) -> Exception:
    """An exception whose class reads like obstore's ``name`` (its module ``obstore.exceptions``)."""
    kind = type(name, (Exception,), {"__module__": "obstore.exceptions"})
    return kind(text)


def request(error: BaseException, **kw: Any):
    return translate(error, during="request", url="s3://b/k.jpg", store="s3://b", **kw)


# -- fields ----------------------------------------------------------------------------------------------------
def test_an_error_with_only_a_message_is_its_one_line_and_has_no_fields():
    error = DataError("bucket 3 has no readable image left")
    assert str(error) == "bucket 3 has no readable image left" and error.fields() == {}
    assert error.to_dict() == {"error": "DataError", "message": "bucket 3 has no readable image left"}
    assert str(ConfigError("x")) == "x" and isinstance(ConfigError("x"), ValueError)


def test_fields_are_keyword_only_attributes_and_fields_returns_the_ones_set():
    error = ObjectMissing("not found: s3://b/k", key="k", source="s3://b/k", epoch=np.int64(2), step=5, status=404)
    assert str(error) == "not found: s3://b/k"
    assert (error.key, error.source, error.epoch, error.step, error.status) == ("k", "s3://b/k", 2, 5, 404)
    assert type(error.epoch) is int
    assert error.fields() == {"key": "k", "source": "s3://b/k", "epoch": 2, "step": 5, "status": 404}
    assert error.to_dict()["error"] == "ObjectMissing"
    with pytest.raises(TypeError):
        DataError("x", bogus=1)  # type: ignore[call-arg]


def test_a_cause_given_as_an_exception_is_kept_as_its_one_line_summary():
    error = StorageError("cannot read x", cause=OSError("disk on fire\nsecond line"))
    assert error.cause == "OSError: disk on fire"


def test_a_bad_field_value_is_a_type_error_that_echoes_it():
    with pytest.raises(TypeError, match="epoch must be an integer or None, got 'two'"):
        DataError("x", epoch="two")  # type: ignore[arg-type]


def test_fields_survive_pickling_and_copy():
    error = ObjectChanged("changed", source="s3://b/k", step=3, status=416, code="InvalidRange", kind="short")
    for again in (pickle.loads(pickle.dumps(error)), error.copy()):
        assert type(again) is ObjectChanged and str(again) == "changed" and again.fields() == error.fields()


# -- the table: a store's request ------------------------------------------------------------------------------
def test_every_row_has_its_own_kind_and_each_during_ends_in_a_catch_all():
    kinds = [rule.kind for rule in TABLE]
    assert len(kinds) == len(set(kinds))
    for during in ("request", "pipeline"):
        assert [rule for rule in TABLE if rule.during == during][-1].when(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("error", "kind", "becomes", "words"),
    [
        (obstore_error("NotFoundError", "Object at location k.jpg not found"), "missing", ObjectMissing,
         "not found: s3://b/k.jpg"),
        (FileNotFoundError("No such file"), "missing", ObjectMissing, "not found: s3://b/k.jpg"),
        (Exception("status code: 404 Not Found: <Code>NoSuchBucket</Code>"), "no_such_bucket", StorageError,
         "bucket of s3://b/k.jpg does not exist (NoSuchBucket)"),
        (Exception("Error performing get: status code: 416 Range Not Satisfiable"), "short", ObjectChanged,
         "s3://b/k.jpg is shorter than indexed (416 Range Not Satisfiable)"),
        (Exception("Error performing get: NotPartial"), "ignores_range", StorageError, "ignores Range requests"),
        (obstore_error("UnauthenticatedError", "bad token"), "credentials", StorageError,
         "credentials rejected for s3://b/k.jpg (bad token)"),
        (Exception("status code: 400 Bad Request <Code>InvalidAccessKeyId</Code>"), "credentials", StorageError,
         "(InvalidAccessKeyId)"),
        (Exception("status code: 403 Forbidden"), "denied", StorageError, "access denied to s3://b/k.jpg (403)"),
        (Exception("status code: 503 Service Unavailable"), "unavailable", StorageError,
         "s3://b/k.jpg: the store s3://b kept failing after 2 retries (503 Service Unavailable)"),
        (ConnectionResetError("reset"), "unavailable", StorageError, "kept failing after 2 retries (reset)"),
        (Exception("HttpError { kind: Connect, source: Os { message: \"Connection refused\" } }"), "unavailable",
         StorageError, "(cannot connect: connection refused)"),
        (Exception("something odd"), "failed", StorageError, "cannot read s3://b/k.jpg: something odd"),
    ],
)  # fmt: skip
def test_a_failed_request_becomes_the_rows_error_with_its_fields(error, kind, becomes, words):
    said = request(error, retried=2)
    assert said.kind == kind and type(said.error) is becomes and words in str(said.error), str(said.error)
    assert "\n" not in str(said.error) and said.error.__cause__ is error
    assert said.error.source == "s3://b/k.jpg" and said.error.kind == kind and said.error.cause
    assert said.transient == (kind == "unavailable")


def test_the_status_and_the_stores_code_are_fields_of_a_storage_error():
    error = request(Exception("status code: 503 Service Unavailable <Code>SlowDown</Code>")).error
    assert (error.status, error.code) == (503, "SlowDown")


def test_a_key_that_looks_like_a_status_says_nothing():
    said = request(Exception("Generic error at https://h/img-503.jpg: something odd"))
    assert said.kind == "failed" and not said.transient


def test_a_precondition_failure_is_a_changed_version_only_when_a_version_was_asked_for():
    refused = obstore_error("PreconditionError", "status code: 412 Precondition Failed")
    said = request(refused, version='"abc"')
    assert said.kind == "version_changed" and isinstance(said.error, ObjectChanged)
    assert str(said.error) == 's3://b/k.jpg changed since indexing: its ETag is no longer "abc"'
    assert request(refused).kind != "version_changed" and not request(refused).transient


def test_a_connection_to_the_refusing_address_is_a_redirect():
    text = "error sending request for url (http://h/x): client error (Connect): tcp connect error: 127.0.0.1:9, x"
    assert request(Exception(text), refused_at="127.0.0.1:9").kind == "redirected"
    assert request(Exception(text)).kind == "unavailable"


def test_the_real_obstore_not_found_is_recognised_by_name():
    """The table matches obstore's classes by name: obstore's own 404 must still read as missing."""
    import obstore
    import obstore.exceptions
    from obstore.store import MemoryStore

    with pytest.raises(Exception) as caught:
        obstore.head(MemoryStore(), "nope")
    assert request(caught.value).kind == "missing"
    from dali_arb import errors

    named = set().union(errors._FINAL, errors._NETWORK_CLASSES)
    for name in sorted(n for n in named if n.startswith("obstore.")):
        assert hasattr(obstore.exceptions, name.rpartition(".")[2]), name


# -- the table: a DALI pipeline's run ---------------------------------------------------------------------------
DALI_TEXT = (
    "Critical error in pipeline:\nError in CPU operator `nvidia.dali.fn.decoders.image`,\nwhich was used in the "
    "pipeline definition with the following traceback:\n\nencountered:\n\nError in thread 0: nvJPEG failed\n"
)


def test_a_dali_failure_is_undecodable_with_its_summary():
    said = translate(RuntimeError(DALI_TEXT), during="pipeline", device="cpu", epoch=1, step=3)
    assert said.kind == "undecodable" and type(said.error) is DeviceError
    assert (
        str(said.error)
        == "the DALI pipeline failed in batch 3 of epoch 1: decoders.image: Error in thread 0: nvJPEG failed"
    )
    assert (said.error.epoch, said.error.step) == (1, 3)
    assert dali_error_summary(RuntimeError(DALI_TEXT)) == "decoders.image: Error in thread 0: nvJPEG failed"


def test_out_of_memory_is_a_resource_error_naming_the_device():
    error = RuntimeError("CUDA allocation failed: out of memory")
    assert is_out_of_memory(error)
    said = translate(error, during="pipeline", device="gpu", epoch=0, step=7)
    assert said.kind == "out_of_memory" and isinstance(said.error, ResourceError)
    assert str(said.error).startswith("the GPU ran out of memory in batch 7 of epoch 0")


def test_our_own_error_from_a_worker_is_rebuilt_and_told_where():
    wrapped = Exception("Exception traceback received from worker thread:\ndali_arb.errors.DataError: bucket 3 empty")
    assert type(raised_by_dali_arb(wrapped)) is DataError and str(raised_by_dali_arb(wrapped)) == "bucket 3 empty"
    said = translate(wrapped, during="pipeline", epoch=2, step=9)
    assert said.kind == "ours" and str(said.error) == "bucket 3 empty" and said.error.fields()["step"] == 9
    ours = DataError("mine", step=1)
    raised = RuntimeError("wrapper")
    raised.__cause__ = ours
    assert translate(raised, during="pipeline", step=4).error is ours and ours.step == 1  # set where raised: kept


def test_translate_says_what_it_needs():
    with pytest.raises(ValueError, match=r"during must be one of .* got 'later'"):
        translate(RuntimeError("x"), during="later")
    with pytest.raises(TypeError, match="needs epoch="):
        translate(RuntimeError("x"), during="pipeline", step=1)


# -- the registry of schemes ---------------------------------------------------------------------------------------
class Memory(Backend):
    """obstore's in-memory store: one per bucket."""

    scheme = "mem"
    label = "memory"

    def __init__(self) -> None:
        self.stores: dict[str, Any] = {}

    def store(self, bucket, options, retry):
        from obstore.store import MemoryStore

        return self.stores.setdefault(bucket, MemoryStore())


@pytest.fixture
def memory(monkeypatch):
    backend = Memory()
    monkeypatch.setitem(SCHEMES, "mem", backend)
    return backend


def test_an_unknown_scheme_is_refused_naming_every_registered_one(monkeypatch):
    with pytest.raises(StorageError) as caught:
        storage.split_url("ftp://host/x")
    assert all(f"{scheme}://" in str(caught.value) for scheme in SCHEMES) and caught.value.source == "ftp://host/x"
    monkeypatch.setitem(SCHEMES, "mem", Memory())
    with pytest.raises(StorageError, match=r"use s3://, gs://, https://, http://, file://, mem:// \(or a local path\)"):
        storage.split_url("ftp://host/x")


def test_a_backend_registered_in_a_test_is_found_and_read(memory):
    import obstore

    assert storage.split_url("mem://box/a/b.bin") == ("mem", "box", "a/b.bin")
    store, key = storage.store_of("mem://box/a/b.bin")
    obstore.put(store, key, b"0123456789")
    assert storage.get_range("mem://box/a/b.bin", 2, 5) == b"234"
    assert storage.head("mem://box/a/b.bin").size == 10
    assert [i.url for i in storage.list_prefix("mem://box/a/")] == ["mem://box/a/b.bin"]
    with pytest.raises(ObjectMissing) as caught:
        storage.get_bytes("mem://box/a/gone.bin")
    assert str(caught.value) == "not found: mem://box/a/gone.bin"
    assert caught.value.fields()["source"] == "mem://box/a/gone.bin" and caught.value.kind == "missing"
    fetcher = Fetcher(concurrency=2)
    try:
        got = fetcher.fetch([Request("mem://box/a/b.bin", 0, 4), Request("mem://box/a/gone.bin", 0, 4)])
    finally:
        fetcher.close()
    assert got[0] == b"0123" and isinstance(got[1], ObjectMissing) and got[1].source == "mem://box/a/gone.bin"


def test_a_backend_that_cannot_list_is_refused_by_its_label(memory, monkeypatch):
    monkeypatch.setattr(memory, "can_list", False)
    with pytest.raises(StorageError, match="mem://box/a/: memory cannot list a folder"):
        list(storage.list_prefix("mem://box/a/"))
    with pytest.raises(StorageError, match="HTTP cannot list a folder"):
        list(storage.list_prefix("https://example.invalid/a/"))


def test_a_url_that_names_no_bucket_says_what_its_scheme_needs():
    with pytest.raises(StorageError, match="s3:///k names no bucket"):
        storage.split_url("s3:///k")
    with pytest.raises(StorageError, match="https:///x names no host"):
        storage.split_url("https:///x")
    with pytest.raises(StorageError, match=r"file://h/x names a host \(h\)"):
        storage.split_url("file://h/x")


def test_local_files_are_a_backend_read_with_the_same_calls(tmp_path):
    path = tmp_path / "a b.bin"
    path.write_bytes(b"abcdefgh")
    url = storage.file_url(path)
    assert url == f"file://{path}" and storage.is_url(url)
    assert storage.get_range(url, 1, 4) == b"bcd" and storage.head(url).size == 8
    assert [i.url for i in storage.list_prefix(storage.file_url(tmp_path) + "/")] == [url]
    with pytest.raises(ObjectMissing) as caught:
        storage.get_range(storage.file_url(tmp_path / "gone.bin"), 0, 1)
    assert caught.value.source == storage.file_url(tmp_path / "gone.bin")


def test_the_storage_layer_fills_the_fields_where_it_raises():
    with pytest.raises(ObjectChanged) as caught:
        storage.check_size("s3://b/k", 10, 12)
    assert caught.value.fields() == {"source": "s3://b/k", "kind": "size_changed"}
    assert isinstance(DaliArbError(), Exception)
