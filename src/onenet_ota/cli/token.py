"""``onenet-ota token``: print the Authorization header value a device sends (spec §3.2).

The default ``et`` is the C SDK's far-future constant 2524579200, so the output equals the
official SDK's token (Appendix B.1). The access key may come from the environment
(``ONENET_OTA_ACCESS_KEY``) to keep it out of shell history.
"""

from __future__ import annotations

import click

from onenet_ota import auth


@click.command()
@click.option("--product-id", required=True, help="Product id (pid), e.g. 123123.")
@click.option(
    "--device-name",
    default=None,
    help="Device name: sign a device-level token (res products/{pid}/devices/{name}).",
)
@click.option(
    "--access-key",
    required=True,
    envvar="ONENET_OTA_ACCESS_KEY",
    show_envvar=True,
    help="Base64 access key (product key, or device key for a device-level token).",
)
@click.option(
    "--method",
    type=click.Choice(auth.METHODS),
    default="sha1",
    show_default=True,
    help="HMAC hash.",
)
@click.option(
    "--et",
    type=click.IntRange(0, 2**63 - 1),
    default=auth.DEFAULT_ET,
    show_default=True,
    help="Expiry, Unix seconds (default: the C SDK's 2050-01-01).",
)
def token(product_id: str, device_name: str | None, access_key: str, method: str, et: int) -> None:
    """Print the Authorization header value for a product or device."""
    try:
        auth.resource(product_id, device_name)
    except ValueError:
        raise click.BadParameter(
            "product id must be 1-32 of [A-Za-z0-9]; device name 1-64 of [A-Za-z0-9_.-]",
            param_hint="'--product-id' / '--device-name'",
        ) from None
    try:
        auth.decode_key(access_key)
    except ValueError as exc:
        # The message names the problem only; the key itself is never echoed.
        raise click.BadParameter(str(exc), param_hint="'--access-key'") from None
    click.echo(
        auth.build_token(product_id, access_key, device_name=device_name, method=method, et=et)
    )
