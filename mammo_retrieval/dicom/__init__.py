"""Reading mammography DICOM: header fields with real-archive fallbacks, validated pixel decoding."""
