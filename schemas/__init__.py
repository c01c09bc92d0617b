"""marshmallow schemas: one module per vendor or PBX, plus the Bitrix24 MESSAGES schema."""
