"""The seed pipeline as the PRIMER card writes it: one DICOM at a time through its DICOMProcessor, then a
timm ResNet-50 in fp32 (batch of one, as the card's usage shows)."""
from __future__ import annotations

import cv2
import numpy as np
import pydicom
import timm
import torch


class DICOMProcessor:  # verbatim from primer-model-card.txt ("Complete Preprocessing Code"); tests use it too
    def __init__(self):
        self.clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))

    def preprocess(self, dicom_path):
        dicom = pydicom.dcmread(dicom_path)
        image = dicom.pixel_array.astype(np.float32)
        if hasattr(dicom, 'PhotometricInterpretation'):
            if dicom.PhotometricInterpretation == "MONOCHROME1":
                image = np.max(image) - image
        p2, p98 = np.percentile(image, (2, 98))
        image = np.clip(image, p2, p98)
        image = ((image - image.min()) / (image.max() - image.min() + 1e-8) * 255)
        image = image.astype(np.uint8)
        image = self.clahe.apply(image)
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
        image = cv2.resize(image, (224, 224), interpolation=cv2.INTER_LINEAR)
        image = image.astype(np.float32) / 255.0
        mean = np.array([0.485, 0.456, 0.406])
        std = np.array([0.229, 0.224, 0.225])
        image = (image - mean) / std
        image = np.transpose(image, (2, 0, 1))
        return image


def run_seed(paths: list, model: torch.nn.Module | None = None) -> np.ndarray:
    """Embeds each file in turn; returns (N, 2048) unit vectors."""
    processor = DICOMProcessor()
    model = model or timm.create_model("resnet50", pretrained=False, num_classes=0).eval()
    out = []
    with torch.no_grad():
        for path in paths:
            image = processor.preprocess(str(path))
            # the card's usage passes the float64 array straight in; fp32 is what the model accepts
            tensor = torch.from_numpy(image).unsqueeze(0).float()
            out.append(torch.nn.functional.normalize(model(tensor), p=2, dim=1).numpy()[0])
    return np.stack(out)
