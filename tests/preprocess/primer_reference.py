"""The PRIMER model card's DICOMProcessor, verbatim (primer-model-card.txt, "Complete Preprocessing Code")."""
import cv2
import numpy as np
import pydicom


class DICOMProcessor:
    def __init__(self):
        self.clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))

    def preprocess(self, dicom_path):
        # 1. Load DICOM
        dicom = pydicom.dcmread(dicom_path)
        image = dicom.pixel_array.astype(np.float32)
        # 2. Handle photometric interpretation
        if hasattr(dicom, 'PhotometricInterpretation'):
            if dicom.PhotometricInterpretation == "MONOCHROME1":
                image = np.max(image) - image
        # 3. Intensity normalization
        p2, p98 = np.percentile(image, (2, 98))
        image = np.clip(image, p2, p98)
        image = ((image - image.min()) / (image.max() - image.min() + 1e-8) * 255)
        image = image.astype(np.uint8)
        # 4. CLAHE enhancement
        image = self.clahe.apply(image)
        # 5. Grayscale to RGB
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
        # 6. Resize
        image = cv2.resize(image, (224, 224), interpolation=cv2.INTER_LINEAR)
        # 7. ImageNet normalization
        image = image.astype(np.float32) / 255.0
        mean = np.array([0.485, 0.456, 0.406])
        std = np.array([0.229, 0.224, 0.225])
        image = (image - mean) / std
        # 8. Convert to tensor (C, H, W)
        image = np.transpose(image, (2, 0, 1))
        return image
