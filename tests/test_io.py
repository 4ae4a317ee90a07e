import pyarrow.fs as pafs
import pytest

from skinray import io


def test_local_round_trip_creates_parent_directories(tmp_path):
    uri = str(tmp_path / "a" / "b" / "file.bin")
    io.write_bytes(uri, b"\x00\x01skinray")
    assert io.read_bytes(uri) == b"\x00\x01skinray"
    assert io.exists(uri)


def test_s3_round_trip_on_a_real_server(s3_bucket):
    uri = f"{s3_bucket}/nested/key.bin"
    io.write_bytes(uri, b"lesion")
    assert io.read_bytes(uri) == b"lesion"
    fs, path = io.resolve(uri)
    assert isinstance(fs, pafs.S3FileSystem)
    assert path == uri.removeprefix("s3://")


def test_missing_object_names_the_uri(s3_bucket, tmp_path):
    for uri in (f"{s3_bucket}/absent.bin", str(tmp_path / "absent.bin")):
        with pytest.raises(FileNotFoundError, match="absent.bin"):
            io.read_bytes(uri)


def test_unsupported_scheme_is_an_error():
    with pytest.raises(ValueError, match="unsupported URI scheme"):
        io.resolve("gs://bucket/key")


def test_join_works_for_paths_and_uris():
    assert (
        io.join("s3://bucket/prefix/", "model", "config.json")
        == "s3://bucket/prefix/model/config.json"
    )
    assert io.join("/tmp/x", "y") == "/tmp/x/y"


def test_a_manifest_entry_is_under_the_manifests_folder_unless_it_names_its_own_place():
    from skinray.io import in_manifest

    assert in_manifest("/data/list.csv", "a/b.jpg") == "/data/a/b.jpg"
    assert in_manifest("s3://bucket/lists/l.txt", "x.jpg") == "s3://bucket/lists/x.jpg"
    assert in_manifest("list.txt", "x.jpg") == "x.jpg"  # named without a folder
    assert in_manifest("s3://b/lists/l.csv", "../img/./a.jpg") == "s3://b/img/a.jpg"
    assert in_manifest("/data/list.csv", " a b.jpg ") == "/data/a b.jpg"
    for own in ("/abs/x.jpg", "s3://b/x.jpg", "file:///tmp/x.jpg", "http://h/x.jpg"):
        assert in_manifest("/data/list.csv", own) == own
