"""Views of finished records: tables and exports (`report`), charts (`plots`), reproducibility bundles
(`bundle`) and saving a variant as a standalone model (`export_model`).

Sits above `running`; never imports `ui` (the UI and the CLI import this package).
"""
