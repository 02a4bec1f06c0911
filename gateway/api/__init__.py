"""The gateway's HTTP adapters: each route parses its wire format, calls the moderation service
(or the registry operations) and renders the answer. No use-case logic lives here."""
