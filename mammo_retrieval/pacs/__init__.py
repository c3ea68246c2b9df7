"""PACS in and out: DICOMweb pulls, a C-STORE listener, Key Object Selection documents."""
