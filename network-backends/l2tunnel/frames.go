package l2tunnel

import (
	"encoding/binary"
	"fmt"
	"net"
)

// Ethernet types of the announcement frames.
const (
	etherTypeIPv4 = 0x0800
	etherTypeARP  = 0x0806
	etherTypeRARP = 0x8035
	etherTypeIPv6 = 0x86dd
)

var broadcastMAC = net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}

// allNodesMAC is the Ethernet multicast address of ff02::1.
var allNodesMAC = net.HardwareAddr{0x33, 0x33, 0, 0, 0, 1}

var allNodesIP = net.ParseIP("ff02::1")

const minFrame = 60 // Ethernet minimum without FCS

func ethHeader(dst, src net.HardwareAddr, etherType uint16) []byte {
	b := make([]byte, 14, 64)
	copy(b[0:6], dst)
	copy(b[6:12], src)
	binary.BigEndian.PutUint16(b[12:14], etherType)
	return b
}

func pad(b []byte) []byte {
	for len(b) < minFrame {
		b = append(b, 0)
	}
	return b
}

func arpBody(op uint16, sha net.HardwareAddr, spa net.IP, tha net.HardwareAddr, tpa net.IP) []byte {
	b := make([]byte, 28)
	binary.BigEndian.PutUint16(b[0:2], 1) // Ethernet
	binary.BigEndian.PutUint16(b[2:4], etherTypeIPv4)
	b[4], b[5] = 6, 4
	binary.BigEndian.PutUint16(b[6:8], op)
	copy(b[8:14], sha)
	copy(b[14:18], spa.To4())
	copy(b[18:24], tha)
	copy(b[24:28], tpa.To4())
	return b
}

// RARPFrame is a reverse-ARP request from mac, as QEMU and VMware send
// after a migration: it carries no IP address and only makes switches
// learn where mac now is.
func RARPFrame(mac net.HardwareAddr) ([]byte, error) {
	if len(mac) != 6 {
		return nil, fmt.Errorf("rarp: mac %v is not an Ethernet address", mac)
	}
	b := ethHeader(broadcastMAC, mac, etherTypeRARP)
	b = append(b, arpBody(3, mac, net.IPv4zero, mac, net.IPv4zero)...)
	return pad(b), nil
}

// GratuitousARPFrame is a broadcast ARP request with sender and target
// address ip from mac (RFC 5227 announcement).
func GratuitousARPFrame(mac net.HardwareAddr, ip net.IP) ([]byte, error) {
	if len(mac) != 6 {
		return nil, fmt.Errorf("garp: mac %v is not an Ethernet address", mac)
	}
	ip4 := ip.To4()
	if ip4 == nil {
		return nil, fmt.Errorf("garp: %v is not an IPv4 address", ip)
	}
	b := ethHeader(broadcastMAC, mac, etherTypeARP)
	b = append(b, arpBody(1, mac, ip4, net.HardwareAddr{0, 0, 0, 0, 0, 0}, ip4)...)
	return pad(b), nil
}

// UnsolicitedNAFrame is an unsolicited neighbour advertisement (RFC 4861
// §7.2.6) for ip from mac to all nodes: override flag set, solicited flag
// clear, target link-layer address option, hop limit 255.
func UnsolicitedNAFrame(mac net.HardwareAddr, ip net.IP) ([]byte, error) {
	if len(mac) != 6 {
		return nil, fmt.Errorf("na: mac %v is not an Ethernet address", mac)
	}
	if ip.To4() != nil || ip.To16() == nil {
		return nil, fmt.Errorf("na: %v is not an IPv6 address", ip)
	}
	src := ip.To16()
	icmp := make([]byte, 32)
	icmp[0] = 136                                     // neighbour advertisement
	binary.BigEndian.PutUint32(icmp[4:8], 0x20000000) // O (override)
	copy(icmp[8:24], src)
	icmp[24], icmp[25] = 2, 1 // target link-layer address, 8 bytes
	copy(icmp[26:32], mac)
	binary.BigEndian.PutUint16(icmp[2:4], icmpv6Checksum(src, allNodesIP, icmp))

	b := ethHeader(allNodesMAC, mac, etherTypeIPv6)
	ip6 := make([]byte, 40)
	ip6[0] = 0x60
	binary.BigEndian.PutUint16(ip6[4:6], uint16(len(icmp)))
	ip6[6] = 58 // ICMPv6
	ip6[7] = 255
	copy(ip6[8:24], src)
	copy(ip6[24:40], allNodesIP.To16())
	b = append(b, ip6...)
	b = append(b, icmp...)
	return pad(b), nil
}

// icmpv6Checksum is the ICMPv6 checksum over the IPv6 pseudo-header and
// msg (whose checksum field must be zero).
func icmpv6Checksum(src, dst net.IP, msg []byte) uint16 {
	var sum uint32
	add := func(b []byte) {
		for i := 0; i+1 < len(b); i += 2 {
			sum += uint32(b[i])<<8 | uint32(b[i+1])
		}
		if len(b)%2 == 1 {
			sum += uint32(b[len(b)-1]) << 8
		}
	}
	add(src.To16())
	add(dst.To16())
	var l [8]byte
	binary.BigEndian.PutUint32(l[0:4], uint32(len(msg)))
	l[7] = 58
	add(l[:])
	add(msg)
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}
