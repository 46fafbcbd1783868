"""What the engines' sans-IO logins share: the two states their drivers act on."""

TLS = "tls"     # the driver runs the TLS handshake, then calls tls_started()
DONE = "done"   # logged in


class LoginMachine:
    """Base of a login state machine whose `state` passes through TLS (when asked for)
    and ends at DONE on success."""

    __slots__ = ()

    @property
    def done(self) -> bool:
        return self.state == DONE

    @property
    def need_tls(self) -> bool:
        return self.state == TLS
