"""Swap URLs: parsing (no network), and the errors VM() and the command line give for bad ones."""

from __future__ import annotations

import pytest

from vmpager.cli import main
from vmpager.devices.url import is_swap_url, parse_swap_url, redact_url
from vmpager.vm.system import VM


def test_standalone_url_with_everything() -> None:
    url = parse_swap_url(
        "redis://alice:p%40ss@10.0.0.5:6380/3?size=4G&replicas=1&timeout=0.5&retry=2&prefix=vm:"
    )
    assert (url.host, url.port, url.db) == ("10.0.0.5", 6380, 3)
    assert (url.username, url.password) == ("alice", "p@ss")
    assert url.size == 4 << 30 and url.replicas == 1
    assert (url.timeout_s, url.retry_s, url.prefix) == (0.5, 2.0, "vm:")
    assert not url.tls and not url.cluster
    assert url.display == "redis://10.0.0.5:6380/3"  # no credentials


def test_defaults_tls_and_cluster() -> None:
    url = parse_swap_url("redis://h?size=1M")
    assert (url.port, url.db, url.replicas, url.prefix) == (6379, 0, None, None)
    assert (url.timeout_s, url.retry_s) == (5.0, 3.0)
    tls = parse_swap_url("rediss://h:7000/0?size=1M&ca=/etc/ca.pem")
    assert tls.tls and tls.ca == "/etc/ca.pem"
    cluster = parse_swap_url("redis+cluster://[::1]:7000?size=64G")
    assert cluster.cluster and cluster.host == "::1" and cluster.retry_s == 15.0
    assert cluster.display == "redis+cluster://[::1]:7000"
    assert parse_swap_url("rediss+cluster://h?size=1G").tls


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("memcache://h?size=1G", "unknown scheme 'memcache'"),
        ("redis://?size=1G", "no host"),
        ("redis://h:6379/0", "size parameter is required"),
        ("redis://h?size=lots", "cannot parse size"),
        ("redis://h?size=1G&sise=2", r"unknown parameter\(s\) sise"),
        ("redis://h?size=1G&size=2G", "given twice: size"),
        ("redis://h?size=1G&replicas=-1", "replicas must be an integer"),
        ("redis://h?size=1G&replicas=99", r"replicas must be in \[0, 16\]"),
        ("redis://h/x?size=1G", "database must be a number"),
        ("redis+cluster://h/2?size=1G", "only database 0"),
        ("redis://h?size=1G&ca=x", "ca is for TLS"),
        ("redis://h?size=1G&timeout=0", "timeout"),
        ("redis://h?size=1G&retry=nan", "retry"),
        ("redis://h:99999?size=1G", "out of range"),
        ("redis://h?size=1G&prefix={x}", "without braces"),
    ],
)
def test_bad_urls_are_value_errors_naming_the_url(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        parse_swap_url(text)
    assert "swap URL" in str(caught.value)


def test_passwords_never_appear_in_messages() -> None:
    with pytest.raises(ValueError) as caught:
        parse_swap_url("redis://bob:hunter2@h?size=1G&bogus=1")
    assert "hunter2" not in str(caught.value) and "bob:***@h" in str(caught.value)
    assert redact_url("rediss://:pw@h:1/0?size=1") == "rediss://:***@h:1/0?size=1"
    assert redact_url("/var/tmp/swap:4G") == "/var/tmp/swap:4G"


def test_is_swap_url() -> None:
    assert is_swap_url("redis://h?size=1G")
    assert not is_swap_url("/var/tmp/swap0:4G") and not is_swap_url(b"redis://h")


def test_vm_refuses_a_bad_url_before_paging() -> None:
    with pytest.raises(ValueError, match="size parameter is required"):
        VM(memory="1M", swap=["redis://127.0.0.1:1/0"])
    with pytest.raises(ValueError, match=r"replicas must be in \[0, 16\]"):
        VM(memory="1M", swap=[], replicas=17)
    with VM(memory="1M", swap=[]) as vm, pytest.raises(ValueError, match=r"'\?size=\.\.\.'"):
        vm.swapon("redis://127.0.0.1:1/0", "4G")


def test_command_line_reports_a_bad_url(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["swapinfo", "--swap", "redis://user:topsecret@h?size=1G&x=1"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "unknown parameter(s) x" in err and "topsecret" not in err
