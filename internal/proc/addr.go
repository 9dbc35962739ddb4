package proc

import (
	"fmt"
	"net"
)

// FreeLoopbackAddr returns a 127.0.0.1 address with a port nobody listens
// on right now, for a daemon about to be started to listen on (another
// process may take the port in between; the daemon then fails to start).
func FreeLoopbackAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("find a free loopback port: %w", err)
	}
	defer l.Close()
	return l.Addr().String(), nil
}
