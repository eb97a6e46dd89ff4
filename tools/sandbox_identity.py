"""Paste filter for the sandbox's Glance: a stand-in for Keystone's auth_token.

Loaded by the sandbox Glance only (never by imagesync). It fills the identity
headers that keystonemiddleware would set, with a default admin identity, but
only those the client did not send: a test acts as another project or as a
non-admin by sending X-Project-Id / X-Roles itself, or, from a clouds.yaml, with
a token `sandbox:PROJECT:ROLE,ROLE:ANYTHING` (auth_type admin_token). Glance's
own `context` middleware and its stock policy then decide, as in production.
"""

DEFAULTS = {
    "HTTP_X_IDENTITY_STATUS": "Confirmed",
    "HTTP_X_PROJECT_ID": "a0000000000000000000000000000adm",
    "HTTP_X_USER_ID": "sandbox-admin",
    "HTTP_X_ROLES": "admin,member,reader",
}


class IdentityFilter:
    def __init__(self, app, defaults):
        self.app = app
        self.defaults = defaults

    def __call__(self, environ, start_response):
        token = environ.get("HTTP_X_AUTH_TOKEN", "")
        if token.startswith("sandbox:"):
            parts = token.split(":")
            if len(parts) >= 3:
                environ.setdefault("HTTP_X_PROJECT_ID", parts[1])
                environ.setdefault("HTTP_X_ROLES", parts[2])
                environ.setdefault("HTTP_X_USER_ID", f"token-{parts[1][:8]}")
        for key, value in self.defaults.items():
            environ.setdefault(key, value)
        return self.app(environ, start_response)


def filter_factory(global_conf, **local_conf):
    defaults = dict(DEFAULTS)
    for key, value in local_conf.items():
        defaults["HTTP_X_" + key.upper().replace("-", "_")] = value

    def _filter(app):
        return IdentityFilter(app, defaults)

    return _filter
