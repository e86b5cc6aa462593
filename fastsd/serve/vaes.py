"""VAE files by name from `--vae-dir` (A1111's models/VAE), for A1111's `sd_vae` option: POST /sdapi/v1/options sets
the server's, a request's `override_settings` its own; GET /sdapi/v1/sd-vae lists them. Values as A1111's: "Automatic"
(the default: a VAE beside the checkpoint file, `<stem>.vae.pt` / `.ckpt` / `.safetensors`, else, as A1111's
find_vae_near_checkpoint, the first listed file whose name starts with the checkpoint's file stem; else the
checkpoint's own: fastsd.vae_files.vae_near_checkpoint), "None" (the checkpoint's own), or a listed file's name (its
stem too): the folder's files and, as A1111 lists them, the `<name>.vae.*` files beside a --model file. A name is
never a path, and answers name files, not the server's folders. At start each model's Automatic VAE is checked and
built (`start`); the worker swaps the VAE before each job (`apply`), keeping each model's own VAE and the last file's
VAE built, so switching back and forth reads a file at most once per switch.
"""
from __future__ import annotations

import logging
import os
import threading

from fastsd.serve.limits import BadRequest
from fastsd.serve.networks import file_identity, file_names

AUTOMATIC, NONE = "Automatic", "None"
log = logging.getLogger("fastsd.serve")


class Vaes:
    def __init__(self, folder: str | None, model_files: list[str] = ()):
        self.folder = folder
        self.model_dirs = sorted({os.path.dirname(os.path.abspath(f)) for f in model_files})  # their *.vae.* files
        self.option = AUTOMATIC  # A1111's sd_vae option (POST /options)
        self._own: dict[int, tuple] = {}  # id(pipe) -> (vae, name, path): the model's VAE as loaded
        self._built: dict[int, tuple] = {}  # id(pipe) -> (path, file identity, vae, name): the last file's VAE
        self._lock = threading.Lock()

    def files(self) -> dict[str, str]:
        """{file name: path} of the VAE files A1111 lists: the checkpoints' folders' `<name>.vae.*` files (here the
        --model files' folders), then the VAE folder's, subfolders searched; read at each call, in A1111's natural
        order by name; of two files with one name the first found wins (fastsd.vae_files.listed_vaes)."""
        from fastsd.vae_files import listed_vaes

        return listed_vaes(self.folder, self.model_dirs)

    def a1111(self) -> list[dict]:
        """A1111's /sd-vae: model_name the file name, filename its path inside the VAE folder (a file beside a
        checkpoint: its name only; answers name no server folder)."""
        def shown(p: str) -> str:
            inside = self.folder and os.path.abspath(p).startswith(os.path.abspath(self.folder) + os.sep)
            return os.path.relpath(p, self.folder) if inside else os.path.basename(p)

        return [{"model_name": n, "filename": shown(p)} for n, p in self.files().items()]

    def check_name(self, value, field: str) -> str:
        """`value` if it is "Automatic", "None" or a VAE of the folder (BadRequest naming `field` otherwise)."""
        self.path(value, None, field)
        return value

    def path(self, value, entry, field: str, warnings: list[str] | None = None) -> str | None:
        """The file a job with sd_vae `value` runs with the model `entry` (None: the model's own VAE). An unknown
        name (or not a string) is a BadRequest naming `field`; given `warnings`, A1111's fallback instead (its
        resolve_vae: "Couldn't find VAE named X; using None instead"): the model's own VAE, the name in `warnings`
        and in the log."""
        from fastsd.vae_files import vae_by_name

        if isinstance(value, str):
            if value == NONE:
                return None
            have = self.files()
            if value in (AUTOMATIC, "auto"):  # ("auto": A1111's is_automatic, for old configs)
                return None if entry is None else self.near(entry, have)
            found = vae_by_name(value, have)
            if found is not None:
                return found
        if warnings is None:
            if not isinstance(value, str):
                raise BadRequest(f"{field} must be a string, got {type(value).__name__}")
            listed = ", ".join(have) if have else ("no VAE files" if self.folder else "no VAE folder (--vae-dir)")
            raise BadRequest(f"{field}: unknown VAE {value!r}; this server has: Automatic, None, {listed} "
                             "(GET /sdapi/v1/sd-vae)")
        note = (f"{field}: unknown VAE {value!r:.200}, the model's own VAE used (as A1111's None; GET "
                "/sdapi/v1/sd-vae lists this server's)")
        log.warning("%s", note)
        warnings.append(note)
        return None

    @staticmethod
    def near(entry, have: dict[str, str]) -> str | None:
        """A1111's Automatic: a VAE beside the checkpoint (<stem>.vae.pt / .ckpt / .safetensors), else the first listed
        one (`have`: beside the --model files and in the folder, A1111's natural order) whose file name starts with
        the checkpoint's stem (fastsd.vae_files.vae_near_checkpoint); None for a folder or random model, or none."""
        from fastsd.vae_files import vae_near_checkpoint

        return vae_near_checkpoint(getattr(entry.pipe, "path", None), have)

    def start(self, entries) -> None:
        """At the server's start, before any job: each model's Automatic VAE (the option's default) checked, built
        and swapped in, said in one line per model: a VAE file that does not fit its model stops the start with a
        one-line CheckpointError naming it (as a bad --model), and no request waits for it to be read."""
        import sys

        from fastsd import CheckpointError
        from fastsd.vae_files import automatic_note, resolve_vae

        if self.option != AUTOMATIC:
            return
        have = self.files()
        for entry in entries:
            path = self.near(entry, have)
            if path is None:
                continue
            beside = os.path.dirname(os.path.abspath(path)) == os.path.dirname(os.path.abspath(entry.pipe.path))
            where = "beside the model" if beside else "in --vae-dir, named as the model"
            try:
                resolve_vae(path, entry.pipe.config)
            except (CheckpointError, OSError, ValueError) as e:
                raise CheckpointError(f"{str(e) or type(e).__name__} (the VAE file {where} {entry.filename}, which "
                                      "A1111's \"Automatic\", the sd_vae option's default, loads in its place; move "
                                      "it away to serve the checkpoint's own)") from None
            self.apply(entry.pipe, path)
            note = automatic_note(os.path.basename(path), where).replace(
                "--vae none uses", 'sd_vae "None" (POST /sdapi/v1/options, override_settings) uses')
            print(f"fastsd: {entry.filename}: {note}", file=sys.stderr)

    def checked_path(self, value, entry, field: str, warnings: list[str] | None = None) -> str | None:
        """`path` of sd_vae `value` for the model `entry` (`warnings`: as `path`'s), its file checked to drive that
        model (keys, shapes, latent channels): BadRequest naming `field` and the file otherwise."""
        from fastsd import CheckpointError
        from fastsd.vae_files import resolve_vae

        path = self.path(value, entry, field, warnings)
        if path is not None:
            try:
                resolve_vae(path, entry.pipe.config)
            except (CheckpointError, OSError, ValueError) as e:
                raise BadRequest(f"{field}: {file_names(str(e) or type(e).__name__, [path])}") from None
        return path

    def apply(self, pipe, path: str | None) -> None:
        """On the worker thread: give `pipe` the VAE of `path` (None: its own). A file read before and unchanged is
        not read again; the model's own VAE is kept from its first swap on."""
        from fastsd import CheckpointError
        from fastsd.vae_files import resolve_vae

        if path is None:  # the model's own: back, if a file's VAE took its place before
            with self._lock:
                own = self._own.get(id(pipe))
            if own is not None and pipe.vae is not own[0]:
                pipe.set_vae(*own, prepared=True)
            return
        with self._lock:
            self._own.setdefault(id(pipe), (pipe.vae, pipe.vae_name, pipe.vae_path))
            built = self._built.get(id(pipe))
        ident = file_identity(path)
        if built is not None and built[0] == path and built[1] == ident:
            if pipe.vae is not built[2]:
                pipe.set_vae(built[2], built[3], path, prepared=True)
            return
        try:
            src = resolve_vae(path, pipe.config)
            vae = src.build(dtype=pipe.dtype, device=pipe.device)
        except (CheckpointError, OSError, ValueError) as e:  # broken since the request was checked
            raise BadRequest(f"sd_vae: {file_names(str(e) or type(e).__name__, [path])}") from None
        with self._lock:
            self._built[id(pipe)] = None  # the last file's VAE goes before the next is set (one built at a time)
        pipe.set_vae(vae, src.name, path)
        with self._lock:
            self._built[id(pipe)] = (path, ident, vae, src.name)
