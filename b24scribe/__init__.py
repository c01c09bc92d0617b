"""b24scribe core: storage, outbox, Bitrix24 client and translation, free of Flask."""
