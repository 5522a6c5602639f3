"""The self-hostable OTA platform: OneNET's classic device API plus a management API."""
