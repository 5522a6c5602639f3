"""``onenet-ota token``: the Appendix B.1 vectors through the real command group."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from onenet_ota import auth
from onenet_ota.cli.main import cli

K1 = "MHEoPy2atlp4V/zqE09jYh/16aWJQkQjtgLsFaCnfvg="
K2 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="

# (key, method, device, sign) from Appendix B.1; all use pid 123123 and et 2524579200.
VECTORS = [
    (K1, "md5", None, "aD7EBzDi3gnhTuI186DKYw%3D%3D"),
    (K1, "md5", "dev01", "z%2FkpB%2FSLmqQ71CDM50uQXg%3D%3D"),
    (K1, "sha1", None, "4%2B7IKBIL5vNCYd9mzZZg40vs9vc%3D"),
    (K1, "sha1", "dev01", "37MTwnM8%2Fn9AhfAk1EWPEevSNIc%3D"),
    (K1, "sha256", None, "nLZr%2B%2FyCWPyEQSlZJ%2Fje4188nsXcGxe059ZepgN25Zk%3D"),
    (K1, "sha256", "dev01", "ZqklpThdPTsziNTwCdXtU%2FF2O6mtpcYTF3MT8DudRi8%3D"),
    (K2, "md5", None, "NrDYedTmz6fydYJkUVeNow%3D%3D"),
    (K2, "md5", "dev01", "O4MbVybkrZaaV6xdwVjwqw%3D%3D"),
    (K2, "sha1", None, "4rDtm2uJARRfB1uyCq4%2BBQxSca0%3D"),
    (K2, "sha1", "dev01", "K7ik2Mrqey7J7PVgySodOijEKFg%3D"),
    (K2, "sha256", None, "vBi19Qi1PKeZ%2BgeOh6pdpjOMB8gMyDAi7RIb8GyffCc%3D"),
    (K2, "sha256", "dev01", "S7wQDI5HloHl791MHm%2FHItCI5yK1aAD5ZYU6jiEDJwQ%3D"),
]


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["token", *args], env=env)
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize(("key", "method", "device", "sign"), VECTORS)
def test_appendix_b1_vectors(key: str, method: str, device: str | None, sign: str) -> None:
    args = ["--product-id", "123123", "--access-key", key, "--method", method]
    if device is not None:
        args += ["--device-name", device]
    code, out, _ = invoke(*args)
    res = "products%2F123123" + (f"%2Fdevices%2F{device}" if device else "")
    assert code == 0
    assert out == f"version=2018-10-31&res={res}&et=2524579200&method={method}&sign={sign}\n"


def test_default_method_and_et_are_the_c_sdks() -> None:
    code, out, _ = invoke("--product-id", "123123", "--access-key", K1)
    assert code == 0
    assert out == (
        "version=2018-10-31&res=products%2F123123&et=2524579200&method=sha1"
        "&sign=4%2B7IKBIL5vNCYd9mzZZg40vs9vc%3D\n"
    )


def test_et_beyond_32_bits_and_key_from_the_environment() -> None:
    code, out, _ = invoke(
        "--product-id", "123123", "--et", "7555917657", env={"ONENET_OTA_ACCESS_KEY": K1}
    )
    assert code == 0
    parsed = auth.parse_token(out.strip())
    assert parsed.et == "7555917657"
    auth.verify_token(parsed, auth.decode_key(K1), now=0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--product-id", "123123", "--access-key", "not base64!"], "--access-key"),
        (["--product-id", "123123", "--access-key", ""], "--access-key"),
        (["--product-id", "12/3", "--access-key", K1], "--product-id"),
        (["--product-id", "123123", "--device-name", "a b", "--access-key", K1], "--device-name"),
        (["--product-id", "123123", "--access-key", K1, "--method", "sha512"], "--method"),
        (["--product-id", "123123", "--access-key", K1, "--et", "-5"], "--et"),
        (["--product-id", "123123", "--access-key", K1, "--et", "soon"], "--et"),
        (["--access-key", K1], "--product-id"),
        (["--product-id", "123123"], "--access-key"),
    ],
)
def test_bad_input_is_a_usage_error(args: list[str], message: str) -> None:
    code, out, err = invoke(*args)
    assert code == 2
    assert out == ""
    assert message in err
    assert "Traceback" not in err
    assert "MHEoPy2atlp4V" not in err  # the key is never echoed back


def test_listed_in_the_group() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    assert "token" in result.stdout
