# The Linux system calls, structures and constants the reactor (reactor_c.pyx) calls directly,
# declared for Cython. Declarations only: nothing here is a module of its own.

cdef extern from "<sys/types.h>":
    ctypedef long ssize_t

cdef extern from "<unistd.h>" nogil:
    int c_close "close"(int fd)

cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        unsigned int u32
        unsigned long long u64
    cdef struct epoll_event:
        unsigned int events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)
    enum:
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    cdef struct sockaddr:
        unsigned short sa_family
    cdef struct sockaddr_storage:
        unsigned short ss_family
    int accept4(int sockfd, sockaddr *addr, socklen_t *addrlen, int flags)
    ssize_t recv(int sockfd, void *buf, size_t len, int flags)
    ssize_t send(int sockfd, const void *buf, size_t len, int flags)
    int setsockopt(int sockfd, int level, int optname, const void *optval, socklen_t optlen)
    int getsockname(int sockfd, sockaddr *addr, socklen_t *addrlen)
    int getpeername(int sockfd, sockaddr *addr, socklen_t *addrlen)
    int shutdown(int sockfd, int how)
    enum:
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        MSG_NOSIGNAL
        SHUT_WR
        AF_INET
        AF_INET6

cdef extern from "<netinet/in.h>" nogil:
    enum:
        IPPROTO_TCP
    cdef struct in_addr:
        pass
    cdef struct in6_addr:
        pass
    cdef struct sockaddr_in:
        unsigned short sin_family
        unsigned short sin_port
        in_addr sin_addr
    cdef struct sockaddr_in6:
        unsigned short sin6_family
        unsigned short sin6_port
        unsigned int sin6_flowinfo
        in6_addr sin6_addr
        unsigned int sin6_scope_id
    unsigned short ntohs(unsigned short)
    unsigned int ntohl(unsigned int)

cdef extern from "<netinet/tcp.h>" nogil:
    enum:
        TCP_NODELAY

cdef extern from "<arpa/inet.h>" nogil:
    const char *inet_ntop(int af, const void *src, char *dst, socklen_t size)
