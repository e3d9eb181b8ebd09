"""A stand-in for the Hugging Face Hub at the huggingface_hub client boundary, for push tests without network.

transformers 5.23's Trainer reaches the Hub through one shared `HfApi` (`transformers.utils.hub.hf_api()`) and calls
`create_repo` (`init_hf_repo`) and `upload_folder` (`push_to_hub`, `_push_from_checkpoint`). `HubRecorder.install`
replaces those two and `create_commit` on the `HfApi` class (so every instance uses them). `upload_folder` builds the
commit operations the client would send, with huggingface_hub's own file filter (`filter_repo_objects`, its
`DEFAULT_IGNORE_PATTERNS`, the caller's patterns and `path_in_repo`), and passes them to `create_commit`, which
records each file's bytes *at call time* (a real asynchronous upload reads them a little later). `materialize`
replays the commits into a folder: the repository as the Hub would hold it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from pathlib import Path

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, RepoUrl
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects


@dataclasses.dataclass
class Commit:
    repo_id: str
    message: str
    revision: str | None
    token: object
    files: dict[str, bytes]  # path in repo -> content

    def paths(self) -> set[str]:
        return set(self.files)


class HubRecorder:
    def __init__(self):
        self.repos: list[dict] = []
        self.uploads: list[dict] = []
        self.commits: list[Commit] = []

    # --- installed on HfApi -------------------------------------------------------------------------------------

    def install(self, monkeypatch) -> HubRecorder:
        recorder = self

        def create_repo(api, repo_id, *, token=None, private=None, repo_type=None, exist_ok=False, **kwargs):
            recorder.repos.append({"repo_id": repo_id, "token": token, "private": private, "exist_ok": exist_ok})
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_commit(api, repo_id, operations, *, commit_message, token=None, revision=None, **kwargs):
            files = {}
            for op in operations:
                if not isinstance(op, CommitOperationAdd):
                    raise AssertionError(f"unexpected commit operation {op!r}")
                source = op.path_or_fileobj
                files[op.path_in_repo] = Path(source).read_bytes() if isinstance(source, (str, Path)) else bytes(source)
            recorder.commits.append(Commit(repo_id, commit_message, revision, token, files))
            n = len(recorder.commits)
            return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{n:040x}", commit_message=commit_message,
                              commit_description="", oid=f"{n:040x}")

        def upload_folder(api, *, repo_id, folder_path, path_in_repo=None, commit_message=None, token=None,
                          run_as_future=False, allow_patterns=None, ignore_patterns=None, revision=None, **kwargs):
            recorder.uploads.append({"repo_id": repo_id, "folder_path": str(folder_path), "path_in_repo": path_in_repo,
                                     "token": token, "run_as_future": run_as_future, "ignore_patterns": ignore_patterns})
            folder = Path(folder_path).expanduser().resolve()
            relpaths = sorted(p.relative_to(folder).as_posix() for p in folder.glob("**/*") if p.is_file())
            ignore = list([ignore_patterns] if isinstance(ignore_patterns, str) else ignore_patterns or [])
            kept = filter_repo_objects(relpaths, allow_patterns=allow_patterns,
                                       ignore_patterns=ignore + DEFAULT_IGNORE_PATTERNS)
            prefix = f"{path_in_repo.strip('/')}/" if path_in_repo else ""
            operations = [CommitOperationAdd(path_in_repo=prefix + rel, path_or_fileobj=str(folder / rel)) for rel in kept]
            info = api.create_commit(repo_id=repo_id, operations=operations, token=token, revision=revision,
                                     commit_message=commit_message or "Upload folder using huggingface_hub")
            if not run_as_future:
                return info
            future = concurrent.futures.Future()
            future.set_result(info)
            return future

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        return self

    # --- reading what was pushed ------------------------------------------------------------------------------------

    def materialize(self, destination) -> Path:
        """The repository after every recorded commit, written to `destination`."""
        destination = Path(destination)
        for commit in self.commits:
            for path, content in commit.files.items():
                target = destination / path
                os.makedirs(target.parent, exist_ok=True)
                target.write_bytes(content)
        return destination

    def all_bytes(self) -> list[tuple[str, bytes]]:
        return [(path, content) for commit in self.commits for path, content in commit.files.items()]
