// The Go anchors: a splice of the shape of upstream's runner, each way and CloseWrite on
// EOF.  Usage: splice MODE LISTEN_PORT TARGET_PORT, where MODE is
//
//	copy    io.Copy, which uses splice(2) between two TCP connections on Linux
//	loop32k a plain 32 KiB read/write loop: the shape io.Copy has on macOS, which has no
//	        splice
package main

import (
	"io"
	"net"
	"os"
)

func loop(dst, src *net.TCPConn) {
	buf := make([]byte, 32*1024)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func pipe(mode string, dst, src *net.TCPConn, done chan<- struct{}) {
	if mode == "loop32k" {
		loop(dst, src)
	} else {
		io.Copy(dst, src)
	}
	dst.CloseWrite()
	done <- struct{}{}
}

func main() {
	mode := os.Args[1]
	ln, err := net.Listen("tcp", "127.0.0.1:"+os.Args[2])
	if err != nil {
		panic(err)
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			continue
		}
		go func(client *net.TCPConn) {
			up, err := net.Dial("tcp", "127.0.0.1:"+os.Args[3])
			if err != nil {
				client.Close()
				return
			}
			upstream := up.(*net.TCPConn)
			done := make(chan struct{}, 2)
			go pipe(mode, upstream, client, done)
			go pipe(mode, client, upstream, done)
			<-done
			<-done
			client.Close()
			upstream.Close()
		}(c.(*net.TCPConn))
	}
}
