"""``edgeward-models``: run the model-distribution service until SIGTERM.

This module owns the command line: flags, the environment variables behind them, their
defaults, JSON logging, and turning a configuration error into a one-line refusal. What
runs is :mod:`.app`.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from edgeward_model_distribution.app import ModelsConfig, run
from edgeward_model_distribution.service import MIN_CHUNK_BYTES, Settings
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.models.release import MAX_CHUNK_BYTES, MAX_DOCUMENT_LIFETIME_MS
from edgeward_shared.ratelimit import Limit
from edgeward_shared.runtime.kit import EnvOptions, NodeOptions, command, node_options
from edgeward_shared.runtime.params import (
    DIRECTORY,
    ByteSizeParam,
    DurationParam,
    RateLimitParam,
    milliseconds,
)

SERVICE = Identity.service(ServiceName.MODEL_DISTRIBUTION)
option = EnvOptions("MODELS")


@command()
@node_options(
    "model-distribution",
    env="MODELS",
    principal=SERVICE,
    database_optional=True,
    syslog=True,
    pki_help="PKI directory: the CA bundle (ca-bundle.pem) that certificates of devices,"
    " operators, model signers and the attestation service must chain to, and the CRL.",
)
@option(
    "--state-dir",
    type=DIRECTORY,
    default=Path("state/models"),
    envvar="EDGEWARD_MODELS_STATE",
    help="Created 0700: models.db (SQLite: versions, rollouts, key log), blobs/ (encrypted"
    " models, content-addressed), uploads/ and kek.pem (the key-encryption key, created on"
    " first start, 0600). Instances on one host share it.",
)
@option(
    "--metadata-ttl",
    type=DurationParam(timedelta(seconds=60), timedelta(milliseconds=MAX_DOCUMENT_LIFETIME_MS)),
    default="24h",
    help="Lifetime of the signed release documents devices get on sync (60s..7d). A device"
    " that has not synced for this long sees its metadata expire (freeze protection).",
)
@option(
    "--chunk-size",
    type=ByteSizeParam(MIN_CHUNK_BYTES, MAX_CHUNK_BYTES),
    default="192KiB",
    help="Bytes per blob chunk sent to devices (1KiB..192KiB; smaller for slow links).",
)
@option(
    "--sync-limit",
    type=RateLimitParam(1000.0, 100_000),
    default="1/s:20",
    help="Per-device limit on sync requests (model.rate_limited beyond it).",
)
@option(
    "--chunk-limit",
    type=RateLimitParam(10_000.0, 1_000_000),
    default="50/s:200",
    help="Per-device limit on chunk requests (model.rate_limited beyond it).",
)
@option(
    "--upload-ttl",
    type=DurationParam(timedelta(minutes=5), timedelta(days=30)),
    default="24h",
    help="An upload nobody touched for this long is purged (its rows and partial file) at"
    " the next publication.",
)
@option(
    "--require-revocations/--allow-without-revocations",
    default=True,
    help="Refuse every data key while no current signed revocation list is held (fail"
    " closed). Allow only in development, without a revocation service.",
)
def main(  # click passes every parameter by keyword
    *,
    node: NodeOptions,
    state_dir: Path,
    metadata_ttl: timedelta,
    chunk_size: int,
    sync_limit: Limit,
    chunk_limit: Limit,
    upload_ttl: timedelta,
    require_revocations: bool,
) -> None:
    """Run the model-distribution service: model store, rollouts, delivery, key release.

    Operators publish models (signed with a model-signing key of role signer, checked
    again here: signature, provenance, monotonic version, decryption, ONNX only), roll
    them out to a canary cohort and then to a percentage of the fleet, and revoke
    versions. Devices sync signed, expiring release documents, fetch the encrypted blob in
    chunks (only the version assigned to them) and get its data key, HPKE-wrapped to the
    session key of their attestation result (tier high: affirming result required). Every
    key release and refusal is recorded with its reason. It follows the revocation plane's
    signed list: revoked devices get no keys, revoked versions stop, and without a current
    list no key is released at all.

    \b
    Example:
      edgeward-models --pki-dir pki --state-dir state/models --broker 127.0.0.1:8883
    """

    def config() -> ModelsConfig:  # inside serve: a ConfigError is a one-line refusal
        return ModelsConfig(
            pki_dir=node.pki.dir,
            identity_dir=node.node_config().identity_dir,
            state_dir=state_dir,
            database=node.database,
            broker=node.broker,
            metrics_port=node.metrics_port,
            syslog=node.syslog_settings(state_dir),
            settings=Settings(
                metadata_ttl_ms=milliseconds(metadata_ttl),
                chunk_size=chunk_size,
                sync_limit=sync_limit,
                chunk_limit=chunk_limit,
                upload_ttl_ms=milliseconds(upload_ttl),
                require_revocations=require_revocations,
            ),
        )

    node.serve(lambda: run(config()))


if __name__ == "__main__":
    main()
