"""Policy reload: read the configuration file again, compile it elsewhere, swap it in;
read the signing key file again (key rotation).

Used by the ReloadPolicy RPC and SIGHUP (``sidecar.server``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import resource
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from .config import SidecarConfig, load_config
from .core.policy import CompiledPolicy, compile_policies
from .errors import ConfigError, FseError, ReloadFailed, SigningKeyError
from .signing import Signer

if TYPE_CHECKING:  # the child process that compiles imports this module: keep it light
    from .service import GuardService

log = logging.getLogger("fse.reload")


class PolicyReloader:
    """Loads the configuration file again and swaps the service's compiled policies.

    Shared by the ReloadPolicy RPC and SIGHUP. Parsing, validating and compiling run in a
    child process (spawned for the reload, gone after it), and only the compiled policies
    come back, pickled. A worker thread is not enough: YAML, pydantic and the automaton
    build hold the GIL for up to ~200 ms at 100k rules (GC passes over a million objects,
    one C call for the automaton), and every session's steps waited that long. Measured
    with 100k literals and 1 000 regexes (``fse-sidecar bench fse``): worst step 256 ms
    and p99 45 ms with a thread, 43 ms and 4.6 ms with the child, whose result costs the
    loop one unpickle of the automaton (~36 ms). A file that fails validation changes
    nothing.
    """

    def __init__(self, service: GuardService, config_path: Path | None) -> None:
        self.service = service
        self.config_path = config_path
        self._lock = asyncio.Lock()  # one reload at a time; a second waits for the first

    async def reload(self) -> dict[str, str]:
        """Policy name -> digest now in force. Raises ConfigError for a bad file, FseError
        (INTERNAL) when the compiling process dies; the old policies stay either way."""
        if self.config_path is None:
            raise ConfigError("this sidecar was not started from a configuration file; nothing to reload")
        path = self.config_path
        cfg = self.service.config
        async with self._lock:
            loop = asyncio.get_running_loop()
            try:
                pool = ProcessPoolExecutor(
                    max_workers=1,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_limit_memory,
                    initargs=(cfg.reload_max_memory_mb << 20,),
                )
                try:
                    # --listen and --record given on the command line stay what they were
                    job = loop.run_in_executor(pool, _load_and_compile, path, cfg.listen, cfg.record_dir)
                    config, policies = await asyncio.wait_for(job, cfg.reload_timeout_s)
                except TimeoutError:
                    for child in list(getattr(pool, "_processes", {}).values()):  # stuck reading or compiling
                        child.kill()
                    raise ReloadFailed(
                        f"policy reload took longer than reload_timeout_s ({cfg.reload_timeout_s:g} s): is {path} "
                        "a file (not a FIFO or a slow mount)? The compiling process was killed"
                    ) from None
                finally:
                    pool.shutdown(wait=False, cancel_futures=True)  # joining the child here would block the loop
            except ConfigError as exc:
                log.error("policy reload refused, the policies in force stay: %s", exc)
                raise
            except ReloadFailed as exc:
                log.error("policy reload failed, the policies in force stay: %s", exc)
                raise
            except MemoryError:
                why = f"compiling the policies needs more than reload_max_memory_mb ({cfg.reload_max_memory_mb} MB)"
                log.error("policy reload failed, the policies in force stay: %s", why)
                raise ReloadFailed(why) from None
            except Exception as exc:  # the child died (out of memory, killed): keep serving the old ones
                log.error("policy reload failed, the policies in force stay: %s: %s", type(exc).__name__, exc)
                raise FseError(f"policy reload failed in its worker process: {type(exc).__name__}: {exc}") from None
            try:
                signer = Signer.from_file(config.signing_key_file)  # a rotated key file, or another path
            except SigningKeyError as exc:
                log.error("reload refused, the policies and key in force stay: %s", exc)
                raise ConfigError(f"signing_key_file: {exc}") from None
            for warning in removed_rules(self.service.policies, policies):
                log.warning("policy reload removes %s", warning)
            self.service.use_policies(policies)
            if signer.key_id != self.service.signer.key_id:
                log.info(
                    "signing key rotated: %s -> %s (open sessions go on under the new key)",
                    self.service.signer.key_id,
                    signer.key_id,
                )
                self.service.signer = signer
            self.service.config = self.service.config.model_copy(update={"signing_key_file": config.signing_key_file})
            ignored = [
                f for f in SidecarConfig.model_fields if f != "policies" and getattr(config, f) != getattr(self.service.config, f)
            ]
            if ignored:
                log.warning(
                    "reload applies policies and the signing key only; restart to apply the changed %s",
                    ", ".join(sorted(ignored)),
                )
            digests = {name: p.digest for name, p in policies.items()}
            log.info("policies reloaded from %s: %s", path, ", ".join(f"{n}={d[:12]}" for n, d in sorted(digests.items())))
            return digests


def removed_rules(old: Mapping[str, CompiledPolicy], new: Mapping[str, CompiledPolicy]) -> list[str]:
    """What a reload from ``old`` to ``new`` takes away: whole policies, and rules by id (new
    sessions are weaker for it; an operator must see it, not find it in a diff)."""

    def ids(p: CompiledPolicy) -> set[str]:
        return {str(r["id"]) for r in json.loads(p.source_json).get("rules", [])} if p.source_json else set()

    out = []
    for name in sorted(old):
        if name not in new:
            out.append(f"policy {name!r} (new sessions naming it are refused)")
            continue
        gone = sorted(ids(old[name]) - ids(new[name]))
        if gone:
            out.append(f"rules {gone} from policy {name!r}")
    return out


def _limit_memory(max_bytes: int) -> None:
    """In the child, before anything is read: its address space is bounded (MemoryError
    past it, reported to the parent; the sidecar's own memory is untouched)."""
    resource.setrlimit(resource.RLIMIT_AS, (max_bytes, max_bytes))


def _load_and_compile(path: Path, listen: str, record_dir: Path | None) -> tuple[SidecarConfig, dict[str, CompiledPolicy]]:
    """In the child: the compiled policies, and the rest of the configuration without its
    rules (unpickling 100k rule objects in the sidecar would cost it what the child saves)."""
    config = load_config(path, overrides={"listen": listen, "record_dir": str(record_dir) if record_dir else None})
    return config.model_copy(update={"policies": {}}), compile_policies(config.policies)
