"""A real Orthanc PACS for the tests: Debian's ``orthanc`` with its DICOMweb plugin (``orthanc-dicomweb``),
a config and a storage folder in a temporary directory, HTTP and DICOM on free loopback ports."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.pg import _free_port as free_port

REQUIRED = os.environ.get("MRETRIEVE_REQUIRE_ORTHANC") == "1"  # .ci/run sets it: CI must run these tests
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def unavailable_reason() -> str | None:
    if shutil.which("Orthanc") is None:
        return "Orthanc not found: install Debian's `orthanc` and `orthanc-dicomweb` (make install does, as root)"
    if not PLUGIN.exists():
        return f"Orthanc's DICOMweb plugin is missing ({PLUGIN}): install Debian's `orthanc-dicomweb`"
    return None


class OrthancServer:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mretrieve-orthanc-"))
        self.http_port, self.dicom_port = free_port(), free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self) -> "OrthancServer":
        config = {
            "Name": "mretrieve-test", "StorageDirectory": str(self.root / "db"),
            "IndexDirectory": str(self.root / "db"), "HttpPort": self.http_port, "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC", "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "HttpBindAddress": "127.0.0.1", "StableAge": 1, "ConcurrentJobs": 1,
            "Plugins": [str(PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        path = self.root / "config.json"
        path.write_text(json.dumps(config))
        self.log = open(self.root / "orthanc.log", "wb")
        self.process = subprocess.Popen(["Orthanc", str(path)], stdout=self.log, stderr=subprocess.STDOUT,
                                        cwd=self.root)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.root / 'orthanc.log').read_text()[-2000:]}")
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        raise RuntimeError("Orthanc did not answer within 30 s")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def upload(self, path: Path) -> dict:
        """POST a DICOM file to Orthanc's REST API (/instances), as a user would load a PACS."""
        request = urllib.request.Request(self.url + "/instances", data=Path(path).read_bytes(), method="POST",
                                         headers={"Content-Type": "application/dicom"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def delete_instance(self, sop_instance_uid: str) -> None:
        """Delete one instance, found by its SOPInstanceUID (/tools/lookup), as an archive prunes one."""
        request = urllib.request.Request(self.url + "/tools/lookup", data=sop_instance_uid.encode(), method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            [found] = [item for item in json.loads(response.read()) if item["Type"] == "Instance"]
        urllib.request.urlopen(urllib.request.Request(f"{self.url}/instances/{found['ID']}", method="DELETE"),
                               timeout=30).read()

    def reset(self) -> None:
        """Delete every patient (a fresh PACS for the next test, without restarting the server)."""
        for patient in self.get("/patients"):
            urllib.request.urlopen(urllib.request.Request(f"{self.url}/patients/{patient}", method="DELETE"),
                                   timeout=30).read()
